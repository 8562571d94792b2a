//! `geek serve`: an HTTP server over the local engine. OpenAI-compatible completions and chat
//! (streaming or not, log-probabilities, llama-server's `grammar`), `GET /v1/models`, geek's
//! own `POST /v1/ask` (an excavation as one JSON trace or a stream of its events), `GET /health`
//! and `GET /metrics`; and llama-server's own `/completion`, `/tokenize`, `/detokenize`,
//! `/apply-template` and `/props`, so that geek's remote backend runs on it as on llama-server. Finished requests'
//! sequences stay cached ([`cache`]): a prompt that extends an earlier one decodes only the
//! new tokens.
//!
//! One engine thread owns the model (see `geek_backend::Engine`); requests reach it through a
//! bounded queue ([`admission`]): at most `--parallel` at once, `--queue` more waiting, and a
//! 503 with `Retry-After` beyond that. A client that goes away cancels its generation and frees
//! its KV sequence; SIGTERM stops accepting and finishes what is in flight.

mod admission;
mod ask;
mod cache;
mod metrics;
mod native;
mod openai;
mod tokens;
mod types;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use geek_agent::Excavator;
use geek_backend::Engine;
use geek_retriever::Retriever;

use crate::config::{AgentOptions, Resolved};
use admission::{bearer, keys_match, Admission, Ticket};
use metrics::{Gauges, Metrics};
use types::{ErrorBody, ErrorDetail};

/// `geek serve`
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (loopback unless told otherwise).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health.
    #[arg(long, env = "GEEK_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Requests on the engine at once.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Requests waiting for the engine before new ones get 503.
    #[arg(long, default_value_t = 32)]
    pub queue: usize,
    /// Seconds a request may take, waiting included (504 after, or the stream ends).
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body: usize,
    /// Most tokens a request may generate.
    #[arg(long, default_value_t = 2048)]
    pub max_tokens: usize,
    /// /v1/ask: default step budget per branch.
    #[arg(long, default_value_t = 8)]
    pub max_steps: usize,
    /// /v1/ask: most branches a request may explore.
    #[arg(long, default_value_t = 3)]
    pub max_explore: usize,
    /// /v1/ask without the passage index (the model answers sub-questions itself).
    #[arg(long)]
    pub no_retrieval: bool,
    /// /v1/ask without the calibration offset.
    #[arg(long)]
    pub no_calibration: bool,
}

/// What every handler shares.
pub struct ServerState {
    engine: Engine,
    model_id: String,
    agent: Excavator,
    admission: Arc<Admission>,
    cache: cache::PromptCache,
    parallel: usize,
    context_per_request: usize,
    metrics: Metrics,
    api_key: Option<String>,
    timeout: Duration,
    max_tokens: usize,
    max_steps: usize,
    max_explore: usize,
}

/// A failed request, answered in OpenAI's error shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    /// 400: the request is wrong.
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
        }
    }

    /// 500: the engine failed.
    pub fn engine(e: impl std::fmt::Display) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            message: e.to_string(),
        }
    }

    /// 503: no room now; the client should retry.
    pub fn busy(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "server_busy",
            message: message.into(),
        }
    }

    /// 504: the request ran out of time.
    pub fn timeout(limit: Duration) -> Self {
        ApiError {
            status: StatusCode::GATEWAY_TIMEOUT,
            kind: "timeout",
            message: format!("the request took longer than {} s", limit.as_secs()),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

/// A backend error: the request's fault (400) or the engine's (500).
impl From<geek_backend::Error> for ApiError {
    fn from(e: geek_backend::Error) -> Self {
        use geek_backend::Error as E;
        match e {
            E::ContextOverflow { .. }
            | E::InvalidParameter(_)
            | E::Grammar(_)
            | E::ChatTemplate(_) => ApiError::invalid(e.to_string()),
            E::KvCacheFull { .. } | E::NoFreeSequence { .. } => ApiError::busy(e.to_string()),
            other => ApiError::engine(other),
        }
    }
}

/// A body that is not the JSON asked for (or too large): the extractor's status and reason.
impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(e: axum::extract::rejection::JsonRejection) -> Self {
        ApiError {
            status: e.status(),
            kind: "invalid_request_error",
            message: e.body_text(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.message,
                kind: self.kind,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl ServerState {
    /// Answers a request refused before it reached the engine, counting it.
    fn refuse(&self, endpoint: &'static str, error: ApiError) -> Response {
        self.metrics.record(endpoint, error.status.as_u16(), 0.0);
        error.into_response()
    }

    /// A place in line for the engine, or the 503 that says to come back.
    fn admit(&self, endpoint: &'static str) -> Result<Ticket, ApiError> {
        self.admission.enter().ok_or_else(|| {
            self.metrics
                .rejected
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.metrics.record(endpoint, 503, 0.0);
            ApiError::busy("the server's queue is full; retry after a second")
        })
    }
}

/// Runs `geek serve` until SIGTERM or Ctrl-C.
pub fn run(args: ServeArgs, config: &Resolved) -> Result<()> {
    let state = Arc::new(server_state(&args, config)?);
    let runtime = config.runtime()?;
    runtime.block_on(async move {
        let addr = SocketAddr::new(args.host, args.port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        println!(
            "geek serve: listening on http://{local} (model {})",
            state.model_id
        );
        use std::io::Write;
        std::io::stdout().flush()?;
        let app = router(state, args.max_body);
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("the server failed")?;
        tracing::info!("stopped: in-flight requests finished");
        Ok(())
    })
}

fn server_state(args: &ServeArgs, config: &Resolved) -> Result<ServerState> {
    if args.parallel == 0 {
        anyhow::bail!("--parallel must be at least 1");
    }
    let engine = config.load_engine(args.parallel, args.max_explore.max(1))?;
    let retriever: Option<Arc<dyn Retriever>> = if args.no_retrieval {
        None
    } else {
        Some(
            config
                .open_retriever()
                .context("/v1/ask retrieves from the passage index (or pass --no-retrieval)")?,
        )
    };
    let options = AgentOptions {
        max_steps: args.max_steps,
        explore: 1,
        pre_answer: false,
        retrieval: !args.no_retrieval,
        passages: 3,
        seed: 0,
        context_limit: Some(crate::config::CONTEXT_PER_QUESTION as usize),
        demonstrations: 0,
        final_reasoning: false,
    };
    let agent = config.excavator(config.local(engine.clone()), retriever, &options)?;
    let agent = if args.no_calibration {
        agent
    } else {
        config
            .runtime()?
            .block_on(config.calibrate_agent(&config.local(engine.clone()), agent))?
    };
    let info = engine.info();
    let model_id = info
        .path
        .file_stem()
        .map_or_else(|| "geek".to_string(), |s| s.to_string_lossy().into_owned());
    Ok(ServerState {
        engine,
        model_id,
        agent,
        admission: Admission::new(args.parallel, args.queue),
        cache: cache::PromptCache::new(args.parallel),
        parallel: args.parallel,
        context_per_request: crate::config::CONTEXT_PER_QUESTION as usize,
        metrics: Metrics::default(),
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        timeout: Duration::from_secs(args.timeout.max(1)),
        max_tokens: args.max_tokens,
        max_steps: args.max_steps,
        max_explore: args.max_explore.max(1),
    })
}

/// The routes, behind the key check and the body limit.
pub fn router(state: Arc<ServerState>, max_body: usize) -> Router {
    let api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/completion", post(native::completion))
        .route("/v1/ask", post(ask::ask))
        .route("/tokenize", post(tokens::tokenize))
        .route("/detokenize", post(tokens::detokenize))
        .route("/apply-template", post(tokens::apply_template))
        .route("/props", get(tokens::props))
        .route("/metrics", get(metrics_text))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/health", get(health))
        .merge(api)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

async fn require_key(
    State(state): State<Arc<ServerState>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(expected) = &state.api_key {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .unwrap_or("");
        if !keys_match(presented.as_bytes(), expected.as_bytes()) {
            return ApiError {
                status: StatusCode::UNAUTHORIZED,
                kind: "authentication_error",
                message: "a valid `Authorization: Bearer` key is required".into(),
            }
            .into_response();
        }
    }
    next.run(request).await
}

async fn health(State(state): State<Arc<ServerState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "ok",
        "model": state.model_id,
        "running": state.admission.running(),
        "waiting": state.admission.waiting(),
    }))
}

async fn models(State(state): State<Arc<ServerState>>) -> Json<serde_json::Value> {
    let info = state.engine.info();
    Json(serde_json::json!({
        "object": "list",
        "data": [{
            "id": state.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "geek",
            "meta": {
                "architecture": info.architecture,
                "n_params": info.n_params,
                "n_ctx": info.n_ctx,
            },
        }],
    }))
}

async fn metrics_text(State(state): State<Arc<ServerState>>) -> Response {
    let live_sequences = match state.engine.stats().await {
        Ok(s) => s.live_sequences,
        Err(e) => return ApiError::engine(e).into_response(),
    };
    let text = state.metrics.render(Gauges {
        running: state.admission.running(),
        waiting: state.admission.waiting(),
        live_sequences,
        cached_sequences: state.cache.len(),
    });
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
