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
//! - `POST /completion` (llama-server's own completion endpoint, which `geek serve` answers
//!   too) rather than `/v1/completions`: it returns the generated token ids (`return_tokens`),
//!   how generation stopped (`stop_type`, `stopping_word`) and the prompt tokens its cache held
//!   (`timings.cache_n`), which OpenAI's shape has no room for; without token ids the text is
//!   tokenized again.
//! - `grammar`, `top_k`, `min_p`, `repeat_penalty`, `n_probs`, `cache_prompt`: sent as
//!   llama-server spells them.
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

    /// Generates after `prompt` (token ids), on llama-server's own `POST /completion`,
    /// streamed: `on_piece` sees the text as it arrives, and dropping the future closes the
    /// connection, which stops the server's generation. Unlike `/v1/completions`, the answer
    /// holds the generated token ids, the stop string that ended the text and the prompt
    /// tokens the server's cache held.
    pub async fn complete(
        &self,
        prompt: &[i32],
        params: &GenerateParams,
        on_piece: &mut (dyn FnMut(&str) + Send),
    ) -> Result<RemoteCompletion> {
        let started = Instant::now();
        let s = &params.sampling;
        // `min_p: 0` and no DRY: the in-process sampler's chain (top-k, top-p, temperature,
        // repeat penalty) rather than llama-server's longer default one.
        let mut body = json!({
            "prompt": prompt, "n_predict": params.max_tokens,
            "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "min_p": 0.0,
            "repeat_penalty": s.repeat_penalty, "repeat_last_n": s.repeat_last_n,
            "dry_multiplier": 0.0, "seed": s.seed, "stop": params.stop,
            "ignore_eos": params.ignore_eos, "cache_prompt": true, "return_tokens": true,
            "stream": true,
        });
        if let Some(g) = &params.grammar {
            body["grammar"] = json!(g);
        }
        if params.logprobs > 0 {
            body["n_probs"] = json!(params.logprobs);
        }
        let response = self.open("/completion", &body).await?;
        let mut done = self.read_stream(response, on_piece).await?;
        if done.tokens.is_empty() && !done.text.is_empty() {
            let mut all = done.text.clone();
            if let StopReason::Stop(word) = &done.stop {
                all.push_str(word);
            }
            done.tokens = self.tokenize(&all, false, false).await?;
        }
        done.seconds = started.elapsed().as_secs_f64();
        Ok(done)
    }

    /// A streamed `/completion` answer added up: text, token ids and probabilities from every
    /// chunk, how it stopped and the prompt counts from the last.
    async fn read_stream(
        &self,
        mut response: reqwest::Response,
        on_piece: &mut (dyn FnMut(&str) + Send),
    ) -> Result<RemoteCompletion> {
        let mut done = RemoteCompletion {
            text: String::new(),
            tokens: Vec::new(),
            stop: StopReason::Cancelled,
            prompt_tokens: 0,
            cached_tokens: 0,
            logprobs: Vec::new(),
            seconds: 0.0,
        };
        let (mut pending, mut read, mut finished) = (Vec::new(), 0, false);
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.error(format!("/completion: the stream broke off ({e})")))?
        {
            read += chunk.len();
            if read > self.config.max_response_bytes {
                return Err(self.error(format!(
                    "/completion: the answer is larger than {} bytes",
                    self.config.max_response_bytes
                )));
            }
            pending.extend_from_slice(&chunk);
            while let Some(event) = next_event(&mut pending) {
                let Some(data) = event.strip_prefix("data: ") else {
                    continue;
                };
                let chunk: Value = serde_json::from_str(data)
                    .map_err(|e| self.error(format!("/completion: not JSON ({e})")))?;
                if let Some(message) = chunk["error"]["message"].as_str() {
                    return Err(self.error(format!("/completion: {message}")));
                }
                let part = read_completion(&chunk).map_err(|e| self.error(e))?;
                on_piece(&part.text);
                done.text.push_str(&part.text);
                done.tokens.extend(part.tokens);
                done.logprobs.extend(part.logprobs);
                if chunk["stop"].as_bool() == Some(true) {
                    (done.stop, done.prompt_tokens) = (part.stop, part.prompt_tokens);
                    done.cached_tokens = part.cached_tokens;
                    finished = true;
                }
            }
        }
        if !finished {
            return Err(self.error("/completion: the stream ended before its last event"));
        }
        Ok(done)
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
            let outcome = match self.send(method, path, body.as_ref()).await {
                Ok(response) => self.read_json(response).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(v) => return Ok(v),
                Err((retryable, reason)) if retryable && attempt < self.config.retries => {
                    self.back_off(path, &reason, attempt).await;
                    attempt += 1;
                }
                Err((_, reason)) => return Err(self.error(format!("{path}: {reason}"))),
            }
        }
    }

    /// A POST whose answer is read as it streams: retried until the server accepts it.
    async fn open(&self, path: &str, body: &Value) -> Result<reqwest::Response> {
        let mut attempt = 0;
        loop {
            match self.send("POST", path, Some(body)).await {
                Ok(response) => return Ok(response),
                Err((retryable, reason)) if retryable && attempt < self.config.retries => {
                    self.back_off(path, &reason, attempt).await;
                    attempt += 1;
                }
                Err((_, reason)) => return Err(self.error(format!("{path}: {reason}"))),
            }
        }
    }

    async fn back_off(&self, path: &str, reason: &str, attempt: u32) {
        let wait = Duration::from_millis(250 << attempt.min(6));
        tracing::warn!(endpoint = %self.config.endpoint, path, %reason, ?wait, "retrying");
        tokio::time::sleep(wait).await;
    }

    /// One HTTP exchange up to a successful status, or whether to retry and why not.
    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> std::result::Result<reqwest::Response, (bool, String)> {
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
        let response = request.send().await.map_err(|e| {
            let why = if e.is_timeout() {
                format!("no answer within {} s", self.config.timeout.as_secs())
            } else {
                format!("cannot connect ({e})")
            };
            (true, why)
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let retryable = status.as_u16() == 429 || status.is_server_error();
        let bytes = self.read_bytes(response).await.unwrap_or_default();
        let message = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(300).collect());
        Err((retryable, format!("HTTP {status}: {message}")))
    }

    /// A whole answer, at most `max_response_bytes` of it.
    async fn read_bytes(
        &self,
        mut response: reqwest::Response,
    ) -> std::result::Result<Vec<u8>, (bool, String)> {
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
        Ok(bytes)
    }

    async fn read_json(
        &self,
        response: reqwest::Response,
    ) -> std::result::Result<Value, (bool, String)> {
        let bytes = self.read_bytes(response).await?;
        serde_json::from_slice(&bytes).map_err(|e| (false, format!("not JSON ({e})")))
    }
}

/// The next whole server-sent event in `pending` (its lines joined), taken out of it.
fn next_event(pending: &mut Vec<u8>) -> Option<String> {
    let end = pending.windows(2).position(|w| w == b"\n\n")?;
    let event: Vec<u8> = pending.drain(..end + 2).collect();
    Some(String::from_utf8_lossy(&event).trim().to_string())
}

/// A `/completion` answer read (`tokens` left empty when the server sent none).
fn read_completion(reply: &Value) -> std::result::Result<RemoteCompletion, &'static str> {
    let text = reply["content"]
        .as_str()
        .ok_or("/completion answered without `content`")?
        .to_string();
    let stop = match (reply["stop_type"].as_str(), reply["stopping_word"].as_str()) {
        (Some("word"), Some(word)) if !word.is_empty() => StopReason::Stop(word.to_string()),
        (Some("limit"), _) => StopReason::MaxTokens,
        _ => StopReason::Eos,
    };
    let tokens = reply["tokens"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter_map(|t| t.as_i64().and_then(|t| i32::try_from(t).ok()))
                .collect()
        })
        .unwrap_or_default();
    let logprobs = reply["completion_probabilities"]
        .as_array()
        .map(|entries| entries.iter().map(chat_token_logprob).collect())
        .unwrap_or_default();
    Ok(RemoteCompletion {
        text,
        tokens,
        stop,
        prompt_tokens: reply["tokens_evaluated"].as_u64().unwrap_or(0) as usize,
        cached_tokens: reply["timings"]["cache_n"].as_u64().unwrap_or(0) as usize,
        logprobs,
        seconds: 0.0,
    })
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
    fn llama_servers_completion_answer_is_read() {
        // What llama-server 0.3.36 answers on /completion (trimmed).
        let v = json!({"content": " is Madrid", "tokens": [314, 28030, 30, 216],
            "stop": true, "stop_type": "word", "stopping_word": ". ", "tokens_evaluated": 11,
            "timings": {"cache_n": 8, "prompt_n": 3},
            "completion_probabilities": [{"id": 314, "token": " is", "logprob": -0.2,
                "top_logprobs": [{"id": 5, "token": " was", "logprob": -2.5},
                                 {"id": 314, "token": " is", "logprob": -0.2}]}]});
        let done = read_completion(&v).unwrap();
        assert_eq!(done.text, " is Madrid");
        assert_eq!(done.tokens, vec![314, 28030, 30, 216]);
        assert_eq!(done.stop, StopReason::Stop(". ".into()));
        assert_eq!((done.prompt_tokens, done.cached_tokens), (11, 8));
        assert_eq!(done.logprobs[0].top[0], (" is".to_string(), -0.2));
        let limit = json!({"content": "x", "stop_type": "limit", "stopping_word": ""});
        assert_eq!(read_completion(&limit).unwrap().stop, StopReason::MaxTokens);
        let eos = json!({"content": "", "stop_type": "eos", "stopping_word": ""});
        assert_eq!(read_completion(&eos).unwrap().stop, StopReason::Eos);
        assert!(read_completion(&json!({"error": "x"})).is_err());
    }

    #[test]
    fn server_sent_events_are_split_whole() {
        let mut pending = b"data: {\"a\": 1}\n\ndata: {\"b\"".to_vec();
        assert_eq!(
            next_event(&mut pending).as_deref(),
            Some("data: {\"a\": 1}")
        );
        assert_eq!(next_event(&mut pending), None);
        pending.extend_from_slice(b": 2}\n\n");
        assert_eq!(
            next_event(&mut pending).as_deref(),
            Some("data: {\"b\": 2}")
        );
        assert!(pending.is_empty());
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
