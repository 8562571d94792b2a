//! `POST /v1/ask`: a question excavated by the server's agent, answered as the JSON trace or
//! streamed as server-sent events (one `event:` per agent event, then `trace`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::Stream;
use geek_agent::Trace;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::types::AskRequest;
use super::{ApiError, ServerState};

const ENDPOINT: &str = "ask";

/// `POST /v1/ask`.
pub async fn ask(
    State(state): State<Arc<ServerState>>,
    body: Result<Json<AskRequest>, JsonRejection>,
) -> Response {
    let started = Instant::now();
    let req = match body {
        Ok(Json(req)) => req,
        Err(e) => return state.refuse(ENDPOINT, e.into()),
    };
    let agent = match checked_agent(&state, &req) {
        Ok(agent) => Arc::new(agent),
        Err(e) => return state.refuse(ENDPOINT, e),
    };
    let ticket = match state.admit(ENDPOINT) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let question = req.question.clone();
    let runner = state.clone();
    // The excavation runs in a task of its own; dropping the response aborts it, which drops
    // its sequences and cancels their generations.
    let task = tokio::spawn(async move {
        let mut ticket = ticket;
        tokio::time::timeout(runner.timeout, async {
            ticket.start().await;
            agent.run_streaming(&question, tx).await
        })
        .await
    });
    let run = AskRun {
        task: Some(task),
        events: rx,
        state: state.clone(),
        started,
        finished: false,
    };
    if req.stream {
        Sse::new(run.stream())
            .keep_alive(KeepAlive::default())
            .into_response()
    } else {
        run.whole().await
    }
}

/// The server's agent with the request's limits, or why they are refused.
fn checked_agent(state: &ServerState, req: &AskRequest) -> Result<geek_agent::Excavator, ApiError> {
    if req.question.trim().is_empty() {
        return Err(ApiError::invalid("question must not be empty"));
    }
    let explore = req.explore.unwrap_or(1);
    if explore == 0 || explore > state.max_explore {
        return Err(ApiError::invalid(format!(
            "explore must be between 1 and {} (the server's --max-explore)",
            state.max_explore
        )));
    }
    let max_steps = req.max_steps.unwrap_or(state.max_steps);
    if max_steps == 0 || max_steps > 32 {
        return Err(ApiError::invalid("max_steps must be between 1 and 32"));
    }
    state
        .agent
        .with_limits(max_steps, explore)
        .map_err(|e| ApiError::invalid(e.to_string()))
}

type RunResult = Result<geek_agent::Result<Trace>, tokio::time::error::Elapsed>;

/// One excavation in flight, aborted when dropped before it ends.
struct AskRun {
    task: Option<JoinHandle<RunResult>>,
    events: mpsc::UnboundedReceiver<geek_agent::Event>,
    state: Arc<ServerState>,
    started: Instant,
    finished: bool,
}

impl Drop for AskRun {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if !self.finished {
            self.state
                .metrics
                .cancelled
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.state
                .metrics
                .record(ENDPOINT, 499, self.started.elapsed().as_secs_f64());
        }
    }
}

impl AskRun {
    /// Waits for the trace.
    async fn join(&mut self) -> Result<Trace, ApiError> {
        let task = self.task.take().expect("joined once");
        let outcome = match task.await {
            Ok(Ok(Ok(trace))) => Ok(trace),
            Ok(Ok(Err(e))) => Err(agent_error(e)),
            Ok(Err(_)) => Err(ApiError::timeout(self.state.timeout)),
            Err(e) => Err(ApiError::engine(format!("the excavation stopped: {e}"))),
        };
        self.finished = true;
        let status = outcome
            .as_ref()
            .map_or_else(|e| e.status().as_u16(), |_| 200);
        self.state
            .metrics
            .record(ENDPOINT, status, self.started.elapsed().as_secs_f64());
        outcome
    }

    async fn whole(mut self) -> Response {
        match self.join().await {
            Ok(trace) => Json(trace).into_response(),
            Err(e) => e.into_response(),
        }
    }

    fn stream(self) -> impl Stream<Item = Result<Event, Infallible>> + Send {
        futures::stream::unfold(Some(self), |run| async move {
            let mut run = run?;
            if let Some(event) = run.events.recv().await {
                let kind = event_name(&event);
                let data = serde_json::to_string(&event).unwrap_or_default();
                return Some((Ok(Event::default().event(kind).data(data)), Some(run)));
            }
            // The agent dropped its sender: it has finished.
            let last = match run.join().await {
                Ok(trace) => Event::default()
                    .event("trace")
                    .data(serde_json::to_string(&trace).unwrap_or_default()),
                Err(e) => Event::default().event("error").data(
                    serde_json::json!({"error": {"message": e.message, "type": e.kind}})
                        .to_string(),
                ),
            };
            drop(run);
            Some((Ok(last), None))
        })
    }
}

/// The SSE event name of an agent event: its `event` tag.
fn event_name(event: &geek_agent::Event) -> String {
    serde_json::to_value(event)
        .ok()
        .and_then(|v| v.get("event").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| "event".into())
}

fn agent_error(e: geek_agent::Error) -> ApiError {
    match e {
        geek_agent::Error::Model(b) => b.into(),
        geek_agent::Error::EmptyQuestion => ApiError::invalid("question must not be empty"),
        other => ApiError::engine(other),
    }
}
