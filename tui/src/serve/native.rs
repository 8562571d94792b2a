//! `POST /completion`: llama-server's own completion endpoint. Geek's remote backend calls it
//! (on llama-server and on `geek serve` alike) because, unlike OpenAI's shape, its answer holds
//! the generated token ids, how generation stopped and how much of the prompt was cached.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::Response;
use axum::Json;
use geek_backend::{Completion, StopReason};
use serde_json::{json, Value};

use super::openai::{invalid, rejection, run, Job, ResponseContext, Shape};
use super::types::{ChatLogprobs, NativeCompletionRequest};
use super::ServerState;

/// `POST /completion`.
pub async fn completion(
    State(state): State<Arc<ServerState>>,
    body: Result<Json<NativeCompletionRequest>, JsonRejection>,
) -> Response {
    let mut req = match body {
        Ok(Json(req)) => req,
        Err(e) => return rejection(&state, "completion", e),
    };
    let shape = Shape::Native {
        logprobs: (req.n_probs > 0).then_some(req.n_probs),
    };
    match req.n_predict {
        Some(n) if n >= 0 => req.sampling.max_tokens = Some(n as usize),
        Some(_) => req.sampling.max_tokens = Some(state.max_tokens),
        None => {}
    }
    match req.sampling.run_settings(req.n_probs, state.max_tokens) {
        Ok((params, adapter)) => {
            let job = Job {
                prompt: req.prompt.into(),
                adapter,
                params,
                stream: req.sampling.stream,
                shape,
                return_tokens: req.return_tokens,
            };
            run(state, job).await
        }
        Err(message) => invalid(&state, "completion", message),
    }
}

/// The whole answer, as llama-server words it. As a stream's last chunk (`streamed`) its
/// text is empty (the pieces carried it) and it holds the generated ids and probabilities
/// (the pieces carried none), so that a client adding up the chunks gets them once.
pub fn whole(
    ctx: &ResponseContext,
    completion: &Completion,
    logprobs: Option<usize>,
    streamed: bool,
) -> Value {
    let (stop_type, stopping_word) = match &completion.stop {
        StopReason::Stop(word) => ("word", word.as_str()),
        StopReason::Eos => ("eos", ""),
        StopReason::MaxTokens | StopReason::ContextFull => ("limit", ""),
        StopReason::Cancelled => ("none", ""),
    };
    let tokens: &[i32] = if ctx.return_tokens {
        &completion.tokens
    } else {
        &[]
    };
    let predicted = completion.tokens.len();
    let mut answer = json!({
        "index": 0, "content": if streamed { "" } else { completion.text.as_str() },
        "tokens": tokens, "id_slot": 0, "stop": true,
        "model": ctx.model, "tokens_predicted": predicted,
        "tokens_evaluated": ctx.prompt_tokens, "stop_type": stop_type,
        "stopping_word": stopping_word, "tokens_cached": ctx.prompt_tokens + predicted,
        "truncated": false,
        "timings": {"cache_n": ctx.cached_tokens,
                    "prompt_n": ctx.prompt_tokens - ctx.cached_tokens,
                    "predicted_n": predicted},
    });
    if let Some(n) = logprobs {
        answer["completion_probabilities"] =
            json!(ChatLogprobs::from_tokens(&completion.logprobs, n).content);
    }
    answer
}

/// One streamed piece of text.
pub fn piece(text: &str) -> Value {
    json!({"index": 0, "content": text, "tokens": [], "stop": false})
}
