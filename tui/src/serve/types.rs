//! The request and response bodies of `geek serve`, in the OpenAI API's shape (with
//! llama-server's `grammar`, `top_k` and `repeat_penalty` extensions) and geek's own `/v1/ask`.

use geek_backend::{ChatMessage, GenerateParams, Sampling, StopReason, TokenLogprob};
use serde::{Deserialize, Serialize};

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// Sampling fields shared by both generation endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingFields {
    /// New tokens at most.
    pub max_tokens: Option<usize>,
    /// Newer name of `max_tokens` (chat).
    pub max_completion_tokens: Option<usize>,
    /// 0 for greedy decoding.
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    pub top_p: Option<f32>,
    /// Top-k (llama-server extension).
    pub top_k: Option<i32>,
    /// Repeat penalty (llama-server extension).
    pub repeat_penalty: Option<f32>,
    /// Seed of the draw.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Option<StopField>,
    /// A GBNF grammar the output must follow (llama-server extension).
    pub grammar: Option<String>,
    /// Completions per prompt: only 1 is served.
    pub n: Option<usize>,
    /// Stream the answer as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// LoRA adapters of this request (llama-server's `lora`: `[{"id": 0, "scale": 0.5}]`,
    /// ids of the adapters the server loaded with `--lora`; adapters not listed are off).
    pub lora: Option<Vec<LoraField>>,
}

/// One entry of a request's `lora`.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct LoraField {
    /// The adapter's index among those the server loaded.
    pub id: usize,
    /// Its scale (0: off).
    pub scale: f32,
}

/// The weights a request runs on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RequestAdapter {
    /// The server's own (its `--lora`, or the base model).
    Server,
    /// What the request's `lora` asked for: one adapter at a scale, or the base model.
    Pinned(Option<(usize, f32)>),
}

/// Tokens a request may generate when it does not say.
pub const DEFAULT_MAX_TOKENS: usize = 256;
/// Top log-probabilities a request may ask for (OpenAI's own limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

impl SamplingFields {
    /// What the engine runs for the request: its generation parameters and its weights.
    pub fn run_settings(
        &self,
        logprobs: usize,
        max_tokens_limit: usize,
    ) -> Result<(GenerateParams, RequestAdapter), String> {
        Ok((self.params(logprobs, max_tokens_limit)?, self.adapter()?))
    }

    /// The weights the request asked for: the engine applies one adapter at a time.
    pub fn adapter(&self) -> Result<RequestAdapter, String> {
        let Some(list) = &self.lora else {
            return Ok(RequestAdapter::Server);
        };
        if let Some(bad) = list.iter().find(|l| !l.scale.is_finite()) {
            return Err(format!("lora {}: the scale must be finite", bad.id));
        }
        let on: Vec<&LoraField> = list.iter().filter(|l| l.scale != 0.0).collect();
        match on.as_slice() {
            [] => Ok(RequestAdapter::Pinned(None)),
            [one] => Ok(RequestAdapter::Pinned(Some((one.id, one.scale)))),
            _ => Err("lora: one adapter with a non-zero scale at a time is served".into()),
        }
    }

    /// The engine's parameters, or what is wrong with the request.
    pub fn params(
        &self,
        logprobs: usize,
        max_tokens_limit: usize,
    ) -> Result<GenerateParams, String> {
        if self.n.is_some_and(|n| n != 1) {
            return Err("only n = 1 is served".into());
        }
        if logprobs > MAX_TOP_LOGPROBS {
            return Err(format!("at most {MAX_TOP_LOGPROBS} top log-probabilities"));
        }
        let max_tokens = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(DEFAULT_MAX_TOKENS);
        if max_tokens == 0 || max_tokens > max_tokens_limit {
            return Err(format!(
                "max_tokens must be between 1 and {max_tokens_limit}"
            ));
        }
        let defaults = Sampling::default();
        // OpenAI's default temperature is 1; greedy decoding needs `temperature: 0`.
        let sampling = Sampling {
            temperature: self.temperature.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(defaults.top_k),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(defaults.repeat_penalty),
            repeat_last_n: defaults.repeat_last_n,
            seed: self.seed.map_or(defaults.seed, |s| s as u32),
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        if stop.iter().any(String::is_empty) {
            return Err("stop strings must not be empty".into());
        }
        Ok(GenerateParams {
            max_tokens,
            sampling,
            stop,
            grammar: self.grammar.clone(),
            ignore_eos: false,
            logprobs,
        })
    }
}

/// A completion prompt.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<i32>),
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// Model name (informational: the server serves one model).
    #[allow(dead_code)]
    pub model: Option<String>,
    /// The prompt: text (special-token markers parsed, as llama-server does) or token ids.
    pub prompt: PromptField,
    /// Return the generated token ids (`tokens`) and the stop string that ended the text
    /// (`stopping_word`) in the choice (llama-server extension).
    #[serde(default)]
    pub return_tokens: bool,
    /// Top log-probabilities per token (0..=20).
    pub logprobs: Option<usize>,
    /// Sampling.
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// `POST /completion`: llama-server's own completion endpoint, as geek's remote backend calls
/// it.
#[derive(Debug, Deserialize)]
pub struct NativeCompletionRequest {
    /// The prompt: text (special-token markers parsed) or token ids.
    pub prompt: PromptField,
    /// New tokens at most (-1 or absent: the server's limit).
    pub n_predict: Option<i64>,
    /// Top probabilities per generated token (0..=20).
    #[serde(default)]
    pub n_probs: usize,
    /// Return the generated token ids.
    #[serde(default)]
    pub return_tokens: bool,
    /// Sampling (`max_tokens` is also read).
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// Model name (informational).
    #[allow(dead_code)]
    pub model: Option<String>,
    /// The conversation, rendered with the GGUF's chat template.
    pub messages: Vec<ChatMessage>,
    /// Return log-probabilities of the generated tokens.
    #[serde(default)]
    pub logprobs: bool,
    /// How many alternatives per token (needs `logprobs`).
    pub top_logprobs: Option<usize>,
    /// Sampling.
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// Token accounting of a response.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Both.
    pub total_tokens: usize,
    /// What the prompt cache held.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens the server's cache already held (not decoded again).
    pub cached_tokens: usize,
}

/// OpenAI's finish reason for a stop reason.
pub fn finish_reason(stop: &StopReason) -> &'static str {
    match stop {
        StopReason::Eos | StopReason::Stop(_) => "stop",
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        StopReason::Cancelled => "cancelled",
    }
}

/// Log-probabilities in the legacy completions shape.
#[derive(Debug, Serialize)]
pub struct CompletionLogprobs {
    /// Tokens generated.
    pub tokens: Vec<String>,
    /// Their log-probabilities.
    pub token_logprobs: Vec<f32>,
    /// The most likely tokens at each position.
    pub top_logprobs: Vec<serde_json::Map<String, serde_json::Value>>,
    /// Character offset of each token in the text.
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// From the engine's per-token log-probabilities.
    pub fn from_tokens(tokens: &[TokenLogprob]) -> Self {
        let mut offset = 0;
        let mut out = CompletionLogprobs {
            tokens: Vec::new(),
            token_logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            text_offset: Vec::new(),
        };
        for t in tokens {
            out.text_offset.push(offset);
            offset += t.token.len();
            out.tokens.push(t.token.clone());
            out.token_logprobs.push(t.logprob);
            out.top_logprobs.push(
                t.top
                    .iter()
                    .map(|(tok, lp)| (tok.clone(), serde_json::json!(lp)))
                    .collect(),
            );
        }
        out
    }
}

/// One alternative token in the chat shape.
#[derive(Debug, Serialize)]
pub struct TopLogprob {
    /// Its text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// Its UTF-8 bytes.
    pub bytes: Vec<u8>,
}

/// One generated token in the chat shape.
#[derive(Debug, Serialize)]
pub struct ChatTokenLogprob {
    /// Its text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// Its UTF-8 bytes.
    pub bytes: Vec<u8>,
    /// The most likely tokens at its position.
    pub top_logprobs: Vec<TopLogprob>,
}

/// `choices[].logprobs` of a chat response.
#[derive(Debug, Serialize)]
pub struct ChatLogprobs {
    /// One entry per generated token.
    pub content: Vec<ChatTokenLogprob>,
}

impl ChatLogprobs {
    /// From the engine's per-token log-probabilities, keeping `top` alternatives.
    pub fn from_tokens(tokens: &[TokenLogprob], top: usize) -> Self {
        let content = tokens
            .iter()
            .map(|t| ChatTokenLogprob {
                token: t.token.clone(),
                logprob: t.logprob,
                bytes: t.token.as_bytes().to_vec(),
                top_logprobs: t
                    .top
                    .iter()
                    .take(top)
                    .map(|(tok, lp)| TopLogprob {
                        token: tok.clone(),
                        logprob: *lp,
                        bytes: tok.as_bytes().to_vec(),
                    })
                    .collect(),
            })
            .collect();
        ChatLogprobs { content }
    }
}

/// `POST /v1/ask`: one question excavated.
#[derive(Debug, Deserialize)]
pub struct AskRequest {
    /// The yes/no question.
    pub question: String,
    /// Step budget per branch (default: the server's).
    pub max_steps: Option<usize>,
    /// Branches explored (default: the server's).
    pub explore: Option<usize>,
    /// Stream the agent's events as server-sent events.
    #[serde(default)]
    pub stream: bool,
}

/// The error body every failure answers with.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    /// For people.
    pub message: String,
    /// For programs: `invalid_request_error`, `authentication_error`, `server_busy`, ...
    #[serde(rename = "type")]
    pub kind: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(json: &str) -> SamplingFields {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn openai_defaults_sample_at_temperature_one() {
        let p = fields("{}").params(0, 1024).unwrap();
        assert_eq!(p.sampling.temperature, 1.0);
        assert_eq!(p.max_tokens, DEFAULT_MAX_TOKENS);
        let p = fields(r#"{"temperature":0,"stop":"\n","max_tokens":5}"#)
            .params(0, 1024)
            .unwrap();
        assert_eq!((p.sampling.temperature, p.max_tokens), (0.0, 5));
        assert_eq!(p.stop, vec!["\n".to_string()]);
    }

    #[test]
    fn bad_requests_are_refused() {
        for bad in [
            r#"{"n":2}"#,
            r#"{"max_tokens":0}"#,
            r#"{"max_tokens":100000}"#,
            r#"{"stop":[""]}"#,
        ] {
            assert!(fields(bad).params(0, 1024).is_err(), "{bad}");
        }
        assert!(fields("{}").params(21, 1024).is_err());
    }

    #[test]
    fn legacy_logprobs_offsets_follow_the_text() {
        let tokens = vec![
            TokenLogprob {
                token: "Hel".into(),
                logprob: -0.5,
                top: vec![("Hel".into(), -0.5), ("He".into(), -1.5)],
            },
            TokenLogprob {
                token: "lo".into(),
                logprob: -0.1,
                top: vec![],
            },
        ];
        let lp = CompletionLogprobs::from_tokens(&tokens);
        assert_eq!(lp.text_offset, vec![0, 3]);
        assert_eq!(lp.top_logprobs[0].len(), 2);
        let chat = ChatLogprobs::from_tokens(&tokens, 1);
        assert_eq!(chat.content[0].top_logprobs.len(), 1);
    }
}
