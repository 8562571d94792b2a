//! `POST /v1/completions` and `POST /v1/chat/completions`: one engine sequence per request,
//! answered whole or streamed as server-sent events. A dropped connection drops the
//! [`Generation`], which cancels it, and the [`Sequence`], which frees its KV cache.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::Stream;
use geek_backend::{
    ChatMessage, Completion, GenEvent, GenerateParams, Generation, Sequence, StopReason,
};
use serde_json::{json, Value};

use super::admission::Ticket;
use super::cache::PromptCache;
use super::types::{
    finish_reason, ChatLogprobs, ChatRequest, CompletionLogprobs, CompletionRequest, PromptField,
    PromptTokensDetails, RequestAdapter, Usage,
};
use super::{native, ApiError, ServerState};

/// What a request's prompt is.
pub(super) enum Prompt {
    /// Raw text (special-token markers parsed, as llama-server does).
    Text(String),
    /// Token ids.
    Tokens(Vec<i32>),
    /// Messages for the GGUF's chat template.
    Chat(Vec<ChatMessage>),
}

impl From<PromptField> for Prompt {
    fn from(field: PromptField) -> Self {
        match field {
            PromptField::Text(text) => Prompt::Text(text),
            PromptField::Tokens(ids) => Prompt::Tokens(ids),
        }
    }
}

/// Which response shape, and how many top log-probabilities it shows (`None`: no log-probs).
#[derive(Debug, Clone, Copy)]
pub(super) enum Shape {
    Text {
        logprobs: Option<usize>,
    },
    Chat {
        logprobs: Option<usize>,
    },
    /// llama-server's own `/completion` shape.
    Native {
        logprobs: Option<usize>,
    },
}

impl Shape {
    fn endpoint(self) -> &'static str {
        match self {
            Shape::Text { .. } => "completions",
            Shape::Chat { .. } => "chat_completions",
            Shape::Native { .. } => "completion",
        }
    }
}

/// A request turned into what the engine runs.
pub(super) struct Job {
    pub prompt: Prompt,
    pub adapter: RequestAdapter,
    pub params: GenerateParams,
    pub stream: bool,
    pub shape: Shape,
    pub return_tokens: bool,
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<Arc<ServerState>>,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(req)) => req,
        Err(e) => return rejection(&state, "completions", e),
    };
    let shape = Shape::Text {
        logprobs: req.logprobs,
    };
    let asked = req.logprobs.map_or(0, |n| n.max(1));
    match req.sampling.run_settings(asked, state.max_tokens) {
        Ok((params, adapter)) => {
            let stream = req.sampling.stream;
            let job = Job {
                prompt: req.prompt.into(),
                adapter,
                params,
                stream,
                shape,
                return_tokens: req.return_tokens,
            };
            run(state, job).await
        }
        Err(message) => invalid(&state, shape.endpoint(), message),
    }
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<Arc<ServerState>>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(req)) => req,
        Err(e) => return rejection(&state, "chat_completions", e),
    };
    let top = req.top_logprobs.unwrap_or(0);
    let shape = Shape::Chat {
        logprobs: req.logprobs.then_some(top),
    };
    if req.messages.is_empty() {
        return invalid(
            &state,
            shape.endpoint(),
            "messages must not be empty".into(),
        );
    }
    let asked = if req.logprobs { top.max(1) } else { 0 };
    match req.sampling.run_settings(asked, state.max_tokens) {
        Ok((params, adapter)) => {
            let stream = req.sampling.stream;
            let prompt = Prompt::Chat(req.messages);
            let job = Job {
                prompt,
                adapter,
                params,
                stream,
                shape,
                return_tokens: false,
            };
            run(state, job).await
        }
        Err(message) => invalid(&state, shape.endpoint(), message),
    }
}

pub(super) fn rejection(state: &ServerState, endpoint: &'static str, e: JsonRejection) -> Response {
    state.refuse(endpoint, e.into())
}

pub(super) fn invalid(state: &ServerState, endpoint: &'static str, message: String) -> Response {
    state.refuse(endpoint, ApiError::invalid(message))
}

/// Counts a request that ends without an answer (client gone, time out) as cancelled.
struct InFlight {
    state: Arc<ServerState>,
    endpoint: &'static str,
    started: Instant,
    finished: bool,
}

impl InFlight {
    fn finish(&mut self, status: u16) {
        self.finished = true;
        self.state
            .metrics
            .record(self.endpoint, status, self.started.elapsed().as_secs_f64());
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.finished {
            self.state.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            self.state
                .metrics
                .record(self.endpoint, 499, self.started.elapsed().as_secs_f64());
        }
    }
}

pub(super) async fn run(state: Arc<ServerState>, job: Job) -> Response {
    let endpoint = job.shape.endpoint();
    let mut ticket = match state.admit(endpoint) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let mut flight = InFlight {
        state: state.clone(),
        endpoint,
        started: Instant::now(),
        finished: false,
    };
    let deadline = tokio::time::Instant::now() + state.timeout;
    let prepared = tokio::time::timeout_at(deadline, async {
        ticket.start().await;
        prefill(&state, &job.prompt, job.adapter).await
    })
    .await;
    let (seq, prompt, cached) = match prepared {
        Ok(Ok(ready)) => ready,
        Ok(Err(e)) => {
            flight.finish(e.status().as_u16());
            return e.into_response();
        }
        Err(_) => {
            flight.finish(504);
            return ApiError::timeout(state.timeout).into_response();
        }
    };
    let generation = seq.generate(job.params.clone());
    let ctx = ResponseContext::new(&state, &job, prompt, cached);
    if job.stream {
        let stream = StreamRun {
            generation,
            seq: Some((seq, job.adapter)),
            _ticket: ticket,
            flight,
            ctx,
            deadline,
            phase: Phase::Start,
        };
        Sse::new(stream.events())
            .keep_alive(KeepAlive::default())
            .into_response()
    } else {
        let mut generation = generation;
        let done = tokio::time::timeout_at(deadline, finish(&mut generation)).await;
        drop(generation);
        match done {
            Ok(Ok(completion)) => {
                state.cache.put(seq, job.adapter).await;
                drop(ticket);
                flight.finish(200);
                state.metrics.tokens(prompt, completion.tokens.len());
                Json(ctx.whole(&completion)).into_response()
            }
            Ok(Err(e)) => {
                flight.finish(e.status().as_u16());
                e.into_response()
            }
            // `flight` counts the cancelled generation when it is dropped.
            Err(_) => ApiError::timeout(state.timeout).into_response(),
        }
    }
}

/// A sequence on the request's weights holding the prompt, continued from a cached one where
/// they share a prefix: the sequence, the prompt's length and how many of its tokens were
/// cached.
async fn prefill(
    state: &ServerState,
    prompt: &Prompt,
    adapter: RequestAdapter,
) -> Result<(Sequence, usize, usize), ApiError> {
    let loaded = state.engine.info().lora_adapters.len();
    if let RequestAdapter::Pinned(Some((id, _))) = adapter {
        if id >= loaded {
            return Err(ApiError::invalid(format!(
                "lora: no adapter {id}; the server loaded {loaded} (geek serve --lora FILE)"
            )));
        }
    }
    let tokens = prompt_tokens(state, prompt).await?;
    if tokens.is_empty() {
        return Err(ApiError::invalid("prompt must not be empty"));
    }
    let reused = state
        .cache
        .sequence_for(&state.engine, &tokens, adapter)
        .await?;
    let new = tokens[reused.cached..].to_vec();
    match reused.seq.append_tokens(new.clone()).await {
        Ok(_) => Ok((reused.seq, tokens.len(), reused.cached)),
        Err(geek_backend::Error::KvCacheFull { .. }) => {
            // Idle cached sequences hold the cells: let them go and decode it all.
            drop(reused);
            state.cache.clear();
            let seq = PromptCache::new_sequence(&state.engine, adapter).await?;
            seq.append_tokens(tokens.clone()).await?;
            Ok((seq, tokens.len(), 0))
        }
        Err(e) => Err(e.into()),
    }
}

/// The prompt's token ids, tokenized as the in-process engine would append it.
async fn prompt_tokens(state: &ServerState, prompt: &Prompt) -> Result<Vec<i32>, ApiError> {
    Ok(match prompt {
        Prompt::Text(text) => state.engine.tokenize_with(text.clone(), true, true).await?,
        Prompt::Tokens(ids) => ids.clone(),
        Prompt::Chat(messages) => {
            let parts = state.engine.chat_parts(messages, true).await?;
            let mut ids = Vec::new();
            for (i, part) in parts.into_iter().enumerate() {
                let add_special = i == 0;
                let part_ids = state
                    .engine
                    .tokenize_with(part.text, add_special, part.special)
                    .await?;
                ids.extend(part_ids);
            }
            ids
        }
    })
}

async fn finish(generation: &mut Generation) -> Result<Completion, ApiError> {
    while let Some(event) = generation.next().await {
        match event {
            GenEvent::Piece(_) => {}
            GenEvent::Done(c) => return Ok(c),
            GenEvent::Failed(e) => return Err(e.into()),
        }
    }
    Err(ApiError::engine(geek_backend::Error::EngineStopped))
}

/// What every response of one request repeats.
pub(super) struct ResponseContext {
    id: String,
    created: u64,
    pub model: String,
    shape: Shape,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub return_tokens: bool,
}

impl ResponseContext {
    fn new(state: &ServerState, job: &Job, prompt_tokens: usize, cached_tokens: usize) -> Self {
        let shape = job.shape;
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let prefix = match shape {
            Shape::Text { .. } => "cmpl",
            Shape::Chat { .. } => "chatcmpl",
            Shape::Native { .. } => "native",
        };
        ResponseContext {
            id: format!("{prefix}-geek-{n}"),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: state.model_id.clone(),
            shape,
            prompt_tokens,
            cached_tokens,
            return_tokens: job.return_tokens,
        }
    }

    fn usage(&self, completion: &Completion) -> Usage {
        let completion_tokens = completion.tokens.len();
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens,
            total_tokens: self.prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: self.cached_tokens,
            },
        }
    }

    /// llama-server's extensions: the generated ids and the stop string that ended the text.
    fn add_tokens(&self, choice: &mut Value, completion: &Completion) {
        if self.return_tokens {
            choice["tokens"] = json!(completion.tokens);
            choice["stopping_word"] = json!(match &completion.stop {
                StopReason::Stop(word) => word.as_str(),
                _ => "",
            });
        }
    }

    fn logprobs(&self, completion: &Completion) -> Value {
        match self.shape {
            Shape::Text { logprobs: Some(n) } => {
                let mut lp = CompletionLogprobs::from_tokens(&completion.logprobs);
                lp.top_logprobs.iter_mut().for_each(|m| m.retain_top(n));
                json!(lp)
            }
            Shape::Chat { logprobs: Some(n) } => {
                json!(ChatLogprobs::from_tokens(&completion.logprobs, n))
            }
            _ => Value::Null,
        }
    }

    /// The whole (non-streamed) response.
    fn whole(&self, completion: &Completion) -> Value {
        let reason = finish_reason(&completion.stop);
        let mut choice = match self.shape {
            Shape::Native { logprobs } => return native::whole(self, completion, logprobs, false),
            Shape::Text { .. } => json!({
                "index": 0, "text": completion.text,
                "logprobs": self.logprobs(completion), "finish_reason": reason,
            }),
            Shape::Chat { .. } => json!({
                "index": 0,
                "message": {"role": "assistant", "content": completion.text},
                "logprobs": self.logprobs(completion), "finish_reason": reason,
            }),
        };
        self.add_tokens(&mut choice, completion);
        let object = match self.shape {
            Shape::Chat { .. } => "chat.completion",
            _ => "text_completion",
        };
        json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [choice], "usage": self.usage(completion),
        })
    }

    /// One streamed chunk: new text, or the end (finish reason, log-probs and usage).
    fn chunk(&self, text: Option<&str>, end: Option<&Completion>) -> Value {
        let reason = end.map(|c| finish_reason(&c.stop));
        let logprobs = end.map_or(Value::Null, |c| self.logprobs(c));
        let (object, choice) = match self.shape {
            Shape::Native { logprobs } => {
                return match end {
                    Some(c) => native::whole(self, c, logprobs, true),
                    None => native::piece(text.unwrap_or("")),
                }
            }
            Shape::Text { .. } => (
                "text_completion",
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": logprobs,
                       "finish_reason": reason}),
            ),
            Shape::Chat { .. } => {
                let delta = match text {
                    Some(t) => json!({"role": "assistant", "content": t}),
                    None => json!({}),
                };
                (
                    "chat.completion.chunk",
                    json!({"index": 0, "delta": delta, "logprobs": logprobs,
                           "finish_reason": reason}),
                )
            }
        };
        let mut chunk = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [choice],
        });
        if let Some(c) = end {
            chunk["usage"] = json!(self.usage(c));
            self.add_tokens(&mut chunk["choices"][0], c);
        }
        chunk
    }
}

/// Keeps the `n` most likely entries of a legacy top-log-probs map.
trait RetainTop {
    fn retain_top(&mut self, n: usize);
}

impl RetainTop for serde_json::Map<String, Value> {
    fn retain_top(&mut self, n: usize) {
        let mut entries: Vec<(String, Value)> = std::mem::take(self).into_iter().collect();
        entries.sort_by(|a, b| {
            let (x, y) = (
                a.1.as_f64().unwrap_or(f64::MIN),
                b.1.as_f64().unwrap_or(f64::MIN),
            );
            y.total_cmp(&x)
        });
        self.extend(entries.into_iter().take(n));
    }
}

enum Phase {
    Start,
    Running,
    Done,
    Over,
}

/// A streamed response. Field order is drop order: the generation is cancelled before its
/// sequence is released, and the place in line is given back last.
struct StreamRun {
    generation: Generation,
    seq: Option<(Sequence, RequestAdapter)>,
    _ticket: Ticket,
    flight: InFlight,
    ctx: ResponseContext,
    deadline: tokio::time::Instant,
    phase: Phase,
}

impl StreamRun {
    fn events(self) -> impl Stream<Item = Result<Event, Infallible>> + Send {
        futures::stream::unfold(self, |mut run| async move {
            let event = run.next_event().await?;
            Some((Ok(event), run))
        })
    }

    async fn next_event(&mut self) -> Option<Event> {
        match self.phase {
            Phase::Start => {
                self.phase = Phase::Running;
                // Chat streams open with the assistant's role, as OpenAI's do.
                if let Shape::Chat { .. } = self.ctx.shape {
                    return Some(Event::default().data(self.ctx.chunk(Some(""), None).to_string()));
                }
                self.running().await
            }
            Phase::Running => self.running().await,
            // llama-server's own stream ends with its last chunk, OpenAI's with `[DONE]`.
            Phase::Done if matches!(self.ctx.shape, Shape::Native { .. }) => None,
            Phase::Done => {
                self.phase = Phase::Over;
                Some(Event::default().data("[DONE]"))
            }
            Phase::Over => None,
        }
    }

    async fn running(&mut self) -> Option<Event> {
        let next = tokio::time::timeout_at(self.deadline, self.generation.next()).await;
        let failure = match next {
            Ok(Some(GenEvent::Piece(text))) => {
                return Some(Event::default().data(self.ctx.chunk(Some(&text), None).to_string()))
            }
            Ok(Some(GenEvent::Done(completion))) => {
                self.phase = Phase::Done;
                let state = self.flight.state.clone();
                if let Some((seq, adapter)) = self.seq.take() {
                    state.cache.put(seq, adapter).await;
                }
                self.flight.finish(200);
                state
                    .metrics
                    .tokens(self.ctx.prompt_tokens, completion.tokens.len());
                let chunk = self.ctx.chunk(None, Some(&completion));
                return Some(Event::default().data(chunk.to_string()));
            }
            Ok(Some(GenEvent::Failed(e))) => ApiError::from(e),
            Ok(None) => ApiError::engine(geek_backend::Error::EngineStopped),
            Err(_) => {
                // Time is up: the stream ends with an error; the generation is cancelled
                // when the stream is dropped.
                self.phase = Phase::Over;
                let error = ApiError::timeout(self.flight.state.timeout);
                return Some(error_event(&error));
            }
        };
        self.flight.finish(failure.status().as_u16());
        self.phase = Phase::Over;
        Some(error_event(&failure))
    }
}

fn error_event(error: &ApiError) -> Event {
    Event::default()
        .data(json!({"error": {"message": error.message, "type": error.kind}}).to_string())
}
