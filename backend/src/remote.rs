//! A model on another machine: a client of an OpenAI-compatible completions server with
//! llama-server's extensions — `llama-server` itself, or `geek serve`.
//!
//! The agent keeps each sequence's tokens on its side and sends them as the prompt (token ids,
//! so the server sees exactly the tokens the in-process engine would); the server's prefix
//! cache (`cache_prompt`) turns the agent's append pattern into decoding only the new tokens,
//! and its counts of cached prompt tokens are reported back. What is used beyond the plain
//! OpenAI API, and what happens without it:
//! - `POST /tokenize` (`content`, `add_special`, `parse_special`): needed; a server without it
//!   is refused with a clear error.
//! - `POST /detokenize` (`tokens`): for scoring candidates.
//! - `POST /apply-template` (`messages`): the server's chat template; needed for chat prompts.
//! - `GET /props` (`default_generation_settings.n_ctx`): the context size; else 4096.
//! - `return_tokens` / `stopping_word` in a completion: the generated token ids and the stop
//!   string that ended it; without them the text is tokenized again.
//! - `grammar`, `top_k`, `repeat_penalty`, `cache_prompt`: sent as llama-server spells them.
//!
//! Requests time out, are retried with exponential backoff on connection errors, 429 and 5xx,
//! and read at most [`RemoteConfig::max_response_bytes`]; every error names the endpoint.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::sampling::GenerateParams;
use crate::types::{ChatMessage, StopReason, TokenLogprob};
use crate::{Error, Result};

/// Where the server is and how to talk to it.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteConfig {
    /// Base URL, e.g. `http://127.0.0.1:8080` (a trailing `/v1` is accepted).
    pub endpoint: String,
    /// Sent as `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// The `model` field of requests (default: the first model the server lists).
    pub model: Option<String>,
    /// Time one HTTP request may take.
    pub timeout: Duration,
    /// Retries after a connection error, 429 or 5xx.
    pub retries: u32,
    /// Largest response body read.
    pub max_response_bytes: usize,
}

impl RemoteConfig {
    /// Defaults for `endpoint`: 300 s timeout, 3 retries, 16 MiB responses.
    pub fn new(endpoint: impl Into<String>) -> Self {
        let endpoint: String = endpoint.into();
        let endpoint = endpoint.trim_end_matches('/');
        let endpoint = endpoint.strip_suffix("/v1").unwrap_or(endpoint).to_string();
        RemoteConfig {
            endpoint,
            api_key: None,
            model: None,
            timeout: Duration::from_secs(300),
            retries: 3,
            max_response_bytes: 16 << 20,
        }
    }
}

/// A generation on the server.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteCompletion {
    /// The text, ending before the stop string.
    pub text: String,
    /// The generated tokens, stop string included (what the server's sequence now ends with).
    pub tokens: Vec<i32>,
    /// Why it ended.
    pub stop: StopReason,
    /// Prompt tokens of the request.
    pub prompt_tokens: usize,
    /// Of those, the tokens the server's prefix cache already held (when it says).
    pub cached_tokens: usize,
    /// Per generated token, when asked for.
    pub logprobs: Vec<TokenLogprob>,
    /// Wall time of the request.
    pub seconds: f64,
}

/// A connected model server.
#[derive(Debug, Clone)]
pub struct RemoteModel {
    config: RemoteConfig,
    client: reqwest::Client,
    model: String,
    n_ctx: usize,
}

impl RemoteModel {
    /// Connects: reads the model list and the context size.
    pub async fn connect(config: RemoteConfig) -> Result<RemoteModel> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| Error::Remote {
                endpoint: config.endpoint.clone(),
                reason: format!("cannot build an HTTP client: {e}"),
            })?;
        let mut remote = RemoteModel {
            config,
            client,
            model: String::new(),
            n_ctx: 4096,
        };
        let models = remote.request("GET", "/v1/models", None).await?;
        let listed = models["data"][0]["id"].as_str().map(str::to_string);
        remote.model = match (remote.config.model.clone(), listed) {
            (Some(m), _) | (None, Some(m)) => m,
            (None, None) => return Err(remote.error("/v1/models lists no model")),
        };
        if let Ok(props) = remote.request("GET", "/props", None).await {
            let n_ctx = props["default_generation_settings"]["n_ctx"]
                .as_u64()
                .or_else(|| props["n_ctx"].as_u64());
            if let Some(n) = n_ctx.filter(|&n| n > 0) {
                remote.n_ctx = n as usize;
            }
        }
        Ok(remote)
    }

    /// The model name requests carry.
    pub fn name(&self) -> &str {
        &self.model
    }

    /// The server's base URL.
    pub fn endpoint(&self) -> &str {
        &self.config.endpoint
    }

    /// Tokens a sequence may hold on the server.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// The server's tokens for `text`.
    pub async fn tokenize(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<i32>> {
        let body = json!({"content": text, "add_special": add_special,
                          "parse_special": parse_special});
        let reply = self.request("POST", "/tokenize", Some(body)).await?;
        let tokens = reply["tokens"]
            .as_array()
            .ok_or_else(|| self.error("/tokenize answered without `tokens`"))?;
        tokens
            .iter()
            .map(|t| {
                t.as_i64()
                    .and_then(|t| i32::try_from(t).ok())
                    .ok_or_else(|| self.error("/tokenize answered a token that is not an id"))
            })
            .collect()
    }

    /// The text of `tokens`.
    pub async fn detokenize(&self, tokens: &[i32]) -> Result<String> {
        let reply = self
            .request("POST", "/detokenize", Some(json!({"tokens": tokens})))
            .await?;
        reply["content"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| self.error("/detokenize answered without `content`"))
    }

    /// `messages` rendered with the server's chat template, opened for the assistant.
    pub async fn apply_template(&self, messages: &[ChatMessage]) -> Result<String> {
        let body = json!({"messages": messages});
        let reply = self.request("POST", "/apply-template", Some(body)).await?;
        reply["prompt"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| self.error("/apply-template answered without `prompt`"))
    }

    /// Generates after `prompt` (token ids).
    pub async fn complete(
        &self,
        prompt: &[i32],
        params: &GenerateParams,
    ) -> Result<RemoteCompletion> {
        let started = Instant::now();
        let s = &params.sampling;
        let mut body = json!({
            "model": self.model, "prompt": prompt, "max_tokens": params.max_tokens,
            "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p,
            "repeat_penalty": s.repeat_penalty, "seed": s.seed, "stop": params.stop,
            "cache_prompt": true, "return_tokens": true, "stream": false,
        });
        if let Some(g) = &params.grammar {
            body["grammar"] = json!(g);
        }
        if params.logprobs > 0 {
            body["logprobs"] = json!(params.logprobs);
            body["n_probs"] = json!(params.logprobs);
        }
        let reply = self.request("POST", "/v1/completions", Some(body)).await?;
        let choice = &reply["choices"][0];
        let text = choice["text"]
            .as_str()
            .ok_or_else(|| self.error("the completion has no text"))?
            .to_string();
        let stop = self.stop_reason(choice, params);
        let tokens = match choice["tokens"].as_array() {
            Some(ids) => ids
                .iter()
                .filter_map(|t| t.as_i64().and_then(|t| i32::try_from(t).ok()))
                .collect(),
            None => {
                let mut all = text.clone();
                if let StopReason::Stop(word) = &stop {
                    all.push_str(word);
                }
                self.tokenize(&all, false, false).await?
            }
        };
        let usage = &reply["usage"];
        Ok(RemoteCompletion {
            text,
            tokens,
            stop,
            prompt_tokens: usage["prompt_tokens"].as_u64().unwrap_or(0) as usize,
            cached_tokens: usage["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0) as usize,
            logprobs: legacy_logprobs(&choice["logprobs"]),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// The stop reason: the server's `stopping_word` when it sends one; else, with a single
    /// stop string asked for, that string; else the end-of-generation token.
    fn stop_reason(&self, choice: &Value, params: &GenerateParams) -> StopReason {
        match choice["finish_reason"].as_str() {
            Some("length") => StopReason::MaxTokens,
            _ => match choice["stopping_word"].as_str() {
                Some(word) if !word.is_empty() => StopReason::Stop(word.to_string()),
                Some(_) => StopReason::Eos,
                None if params.stop.len() == 1 => StopReason::Stop(params.stop[0].clone()),
                None => StopReason::Eos,
            },
        }
    }

    fn error(&self, reason: impl Into<String>) -> Error {
        Error::Remote {
            endpoint: self.config.endpoint.clone(),
            reason: reason.into(),
        }
    }

    /// One request with retries; the JSON answer.
    async fn request(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let mut attempt = 0;
        loop {
            match self.attempt(method, path, body.as_ref()).await {
                Ok(v) => return Ok(v),
                Err((retryable, reason)) if retryable && attempt < self.config.retries => {
                    let wait = Duration::from_millis(250 << attempt.min(6));
                    tracing::warn!(endpoint = %self.config.endpoint, path, %reason, ?wait, "retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err((_, reason)) => return Err(self.error(format!("{path}: {reason}"))),
            }
        }
    }

    /// One HTTP exchange: the JSON answer, or whether to retry and why not.
    async fn attempt(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> std::result::Result<Value, (bool, String)> {
        let url = format!("{}{path}", self.config.endpoint);
        let mut request = match method {
            "GET" => self.client.get(&url),
            _ => self.client.post(&url),
        };
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let mut response = request.send().await.map_err(|e| {
            let why = if e.is_timeout() {
                format!("no answer within {} s", self.config.timeout.as_secs())
            } else {
                format!("cannot connect ({e})")
            };
            (true, why)
        })?;
        let status = response.status();
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| (true, format!("the answer broke off ({e})")))?
        {
            if bytes.len() + chunk.len() > self.config.max_response_bytes {
                return Err((
                    false,
                    format!(
                        "the answer is larger than {} bytes",
                        self.config.max_response_bytes
                    ),
                ));
            }
            bytes.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes);
            let message = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| text.chars().take(300).collect());
            let retryable = status.as_u16() == 429 || status.is_server_error();
            return Err((retryable, format!("HTTP {status}: {message}")));
        }
        serde_json::from_slice(&bytes).map_err(|e| (false, format!("not JSON ({e})")))
    }
}

/// Per-token log-probabilities of a completion, in either shape servers use: OpenAI's legacy
/// completions shape (`tokens`, `token_logprobs`, `top_logprobs` maps), which `geek serve`
/// answers, or the chat shape (`content: [{token, logprob, top_logprobs: [{token, logprob}]}]`),
/// which llama-server answers on `/v1/completions` too.
fn legacy_logprobs(value: &Value) -> Vec<TokenLogprob> {
    if let Some(content) = value["content"].as_array() {
        return content.iter().map(chat_token_logprob).collect();
    }
    let (Some(tokens), Some(lps)) = (
        value["tokens"].as_array(),
        value["token_logprobs"].as_array(),
    ) else {
        return Vec::new();
    };
    let tops = value["top_logprobs"].as_array();
    tokens
        .iter()
        .zip(lps)
        .enumerate()
        .map(|(i, (t, lp))| {
            let mut top: Vec<(String, f32)> = tops
                .and_then(|tops| tops.get(i))
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_f64()? as f32)))
                        .collect()
                })
                .unwrap_or_default();
            top.sort_by(|a, b| b.1.total_cmp(&a.1));
            TokenLogprob {
                token: t.as_str().unwrap_or_default().to_string(),
                logprob: lp.as_f64().unwrap_or(f64::NEG_INFINITY) as f32,
                top,
            }
        })
        .collect()
}

/// One token of the chat log-probability shape.
fn chat_token_logprob(entry: &Value) -> TokenLogprob {
    let mut top: Vec<(String, f32)> = entry["top_logprobs"]
        .as_array()
        .map(|alts| {
            alts.iter()
                .filter_map(|a| {
                    Some((
                        a["token"].as_str()?.to_string(),
                        a["logprob"].as_f64()? as f32,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    TokenLogprob {
        token: entry["token"].as_str().unwrap_or_default().to_string(),
        logprob: entry["logprob"].as_f64().unwrap_or(f64::NEG_INFINITY) as f32,
        top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_normalised() {
        assert_eq!(RemoteConfig::new("http://h:1/v1/").endpoint, "http://h:1");
        assert_eq!(RemoteConfig::new("http://h:1").endpoint, "http://h:1");
    }

    #[test]
    fn legacy_log_probs_are_read_best_first() {
        let v = json!({"tokens": [" yes"], "token_logprobs": [-0.1],
                       "top_logprobs": [{" no": -2.5, " yes": -0.1}]});
        let lp = legacy_logprobs(&v);
        assert_eq!(lp[0].token, " yes");
        assert_eq!(lp[0].top[0].0, " yes");
        assert_eq!(lp[0].top[1], (" no".to_string(), -2.5));
        assert!(legacy_logprobs(&Value::Null).is_empty());
    }

    #[test]
    fn llama_servers_chat_shaped_log_probs_are_read() {
        // What llama-server answers on /v1/completions with `logprobs`.
        let v = json!({"content": [{"id": 12095, "token": " Paris", "logprob": -0.74,
            "top_logprobs": [{"id": 1304, "token": " __", "logprob": -2.73},
                             {"id": 12095, "token": " Paris", "logprob": -0.74}]}]});
        let lp = legacy_logprobs(&v);
        assert_eq!(lp.len(), 1);
        assert_eq!(lp[0].token, " Paris");
        assert_eq!(lp[0].top[0], (" Paris".to_string(), -0.74));
        assert_eq!(lp[0].top.len(), 2);
    }

    #[tokio::test]
    async fn an_unreachable_server_is_a_typed_error_naming_it() {
        let mut config = RemoteConfig::new("http://127.0.0.1:9");
        config.retries = 1;
        config.timeout = Duration::from_secs(2);
        let err = RemoteModel::connect(config).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("http://127.0.0.1:9"), "{text}");
        assert!(text.contains("cannot connect"), "{text}");
    }
}
