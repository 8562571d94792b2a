//! llama-server's helper endpoints, which geek's remote backend relies on: `POST /tokenize`,
//! `POST /detokenize`, `POST /apply-template` and `GET /props`.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use geek_backend::ChatMessage;
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, ServerState};

/// `POST /tokenize`.
#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    content: String,
    #[serde(default)]
    add_special: bool,
    #[serde(default = "yes")]
    parse_special: bool,
}

fn yes() -> bool {
    true
}

/// `POST /detokenize`.
#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    tokens: Vec<i32>,
}

/// `POST /apply-template`.
#[derive(Debug, Deserialize)]
pub struct TemplateRequest {
    messages: Vec<ChatMessage>,
}

fn bad_body(e: JsonRejection) -> Response {
    ApiError::from(e).into_response()
}

/// `POST /tokenize`: `{"tokens": [...]}`.
pub async fn tokenize(
    State(state): State<Arc<ServerState>>,
    body: Result<Json<TokenizeRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(req)) => req,
        Err(e) => return bad_body(e),
    };
    match state
        .engine
        .tokenize_with(req.content, req.add_special, req.parse_special)
        .await
    {
        Ok(tokens) => Json(json!({ "tokens": tokens })).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// `POST /detokenize`: `{"content": "..."}`.
pub async fn detokenize(
    State(state): State<Arc<ServerState>>,
    body: Result<Json<DetokenizeRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(req)) => req,
        Err(e) => return bad_body(e),
    };
    match state.engine.detokenize(req.tokens).await {
        Ok(content) => Json(json!({ "content": content })).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// `POST /apply-template`: `{"prompt": "..."}`, opened for the assistant.
pub async fn apply_template(
    State(state): State<Arc<ServerState>>,
    body: Result<Json<TemplateRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(req)) => req,
        Err(e) => return bad_body(e),
    };
    match state.engine.chat_prompt(&req.messages, true).await {
        Ok(prompt) => Json(json!({ "prompt": prompt })).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// `GET /props`: the context one request may use, and the engine's slots.
pub async fn props(State(state): State<Arc<ServerState>>) -> Json<serde_json::Value> {
    let info = state.engine.info();
    Json(json!({
        "default_generation_settings": { "n_ctx": state.context_per_request },
        "total_slots": state.parallel,
        "model_path": info.path,
        "chat_template": info.chat_template,
    }))
}
