//! The agent on a model server ([`RemoteModel`]: llama-server or `geek serve`) instead of the
//! in-process engine.
//!
//! A [`RemoteSequence`] keeps its token ids on this side and sends them whole with every
//! generation (streamed back, so the TUI shows tokens as they come); the server's prefix cache decodes only what is new, and the trace counts what
//! the server says it had cached. Forking and truncating are local (copies of the id list).
//! Scoring a candidate asks for one token with the top 20 log-probabilities at each of its
//! token positions: a candidate token outside the top 20 gets the 20th's log-probability (an
//! upper bound), where the in-process engine computes it exactly.
//!
//! Several servers of one model form a pool ([`Remote::pool`]): each new sequence goes to the
//! server holding the fewest, and its forks follow it, so a batch evaluation spreads its
//! questions over the servers while each question keeps one server's prefix cache.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use geek_backend::remote::RemoteModel;
use geek_backend::{
    marked_messages, split_rendered, ChatMessage, Completion, GenerateParams, PrefillStats,
    PromptPart, Sampling,
};

use crate::model::{AgentModel, AgentSequence};
use crate::Result;

/// Top log-probabilities asked for when scoring.
const SCORE_TOP: usize = 20;

/// The model servers the agent runs on: one, or several serving the same model.
#[derive(Debug, Clone)]
pub struct Remote {
    servers: Arc<[Arc<Server>]>,
}

/// One server and how many sequences live on it.
#[derive(Debug)]
struct Server {
    model: RemoteModel,
    live: AtomicUsize,
}

/// A sequence's place on a server: counted while it lives.
struct Lease(Arc<Server>);

impl Server {
    fn new(model: RemoteModel) -> Arc<Server> {
        Arc::new(Server {
            model,
            live: AtomicUsize::new(0),
        })
    }
}

impl Lease {
    fn on(server: &Arc<Server>) -> Lease {
        server.live.fetch_add(1, Ordering::Relaxed);
        Lease(server.clone())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::ops::Deref for Lease {
    type Target = RemoteModel;
    fn deref(&self) -> &RemoteModel {
        &self.0.model
    }
}

impl Remote {
    /// Wraps a connected server.
    pub fn new(model: RemoteModel) -> Self {
        Remote {
            servers: Arc::from([Server::new(model)]),
        }
    }

    /// Several servers of one model: each new sequence goes to the one holding the fewest
    /// (its forks stay with it, so its prefix stays in that server's cache). An error names
    /// the server whose model differs from the first's.
    pub fn pool(models: Vec<RemoteModel>) -> Result<Self> {
        let Some(first) = models.first() else {
            return Err(crate::Error::Config("no model server given".into()));
        };
        if let Some(other) = models.iter().find(|m| m.name() != first.name()) {
            return Err(geek_backend::Error::Remote {
                endpoint: other.endpoint().to_string(),
                reason: format!(
                    "serves {}, where {} serves {}: one run needs one model",
                    other.name(),
                    first.endpoint(),
                    first.name()
                ),
            }
            .into());
        }
        let servers: Vec<Arc<Server>> = models.into_iter().map(Server::new).collect();
        Ok(Remote {
            servers: servers.into(),
        })
    }

    /// The first server.
    pub fn server(&self) -> &RemoteModel {
        &self.servers[0].model
    }

    /// Every server.
    pub fn servers(&self) -> impl Iterator<Item = &RemoteModel> {
        self.servers.iter().map(|s| &s.model)
    }

    /// The server with the fewest live sequences (the first of equals).
    fn least_busy(&self) -> &Arc<Server> {
        self.servers
            .iter()
            .min_by_key(|s| s.live.load(Ordering::Relaxed))
            .expect("a pool holds at least one server")
    }
}

/// A token sequence kept on this side and sent to its server as the prompt.
pub struct RemoteSequence {
    model: Lease,
    tokens: Mutex<Vec<i32>>,
}

impl RemoteSequence {
    fn snapshot(&self) -> Vec<i32> {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Appends `ids`; the stats say what the server will have to decode at the next request.
    fn extend(&self, ids: &[i32]) -> PrefillStats {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let reused = tokens.len();
        tokens.extend_from_slice(ids);
        PrefillStats {
            decoded: 0,
            reused,
            total: tokens.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Log-probability of each candidate after the sequence.
    async fn score_candidates(&self, candidates: &[&str]) -> Result<Vec<f32>> {
        let prefix = self.snapshot();
        let first = self.top_after(&prefix).await?;
        let mut scores = Vec::with_capacity(candidates.len());
        for candidate in candidates {
            let ids = self.model.tokenize(candidate, false, false).await?;
            let mut total = 0.0;
            let mut context = prefix.clone();
            for (i, id) in ids.iter().enumerate() {
                let top = if i == 0 {
                    first.clone()
                } else {
                    self.top_after(&context).await?
                };
                let piece = self.model.detokenize(&[*id]).await?;
                let floor = top.last().map_or(f32::NEG_INFINITY, |t| t.1);
                total += top
                    .iter()
                    .find(|(text, _)| *text == piece)
                    .map_or(floor, |t| t.1);
                context.push(*id);
            }
            scores.push(total);
        }
        Ok(scores)
    }

    /// The most likely next tokens after `context`, best first.
    async fn top_after(&self, context: &[i32]) -> Result<Vec<(String, f32)>> {
        let params = GenerateParams {
            max_tokens: 1,
            sampling: Sampling::greedy(),
            logprobs: SCORE_TOP,
            ..GenerateParams::default()
        };
        let done = self.model.complete(context, &params, &mut |_| {}).await?;
        let top = done
            .logprobs
            .into_iter()
            .next()
            .map(|t| t.top)
            .unwrap_or_default();
        if top.is_empty() {
            // Without them every candidate would score -inf and the answer would be "no".
            return Err(geek_backend::Error::Remote {
                endpoint: self.model.endpoint().to_string(),
                reason: "the server returned no log-probabilities, which scoring needs".into(),
            }
            .into());
        }
        Ok(top)
    }
}

impl AgentModel for Remote {
    fn describe(&self) -> String {
        let endpoints: Vec<&str> = self.servers().map(RemoteModel::endpoint).collect();
        format!("{} at {}", self.server().name(), endpoints.join(", "))
    }

    fn chat_prompt<'a>(
        &'a self,
        system: &'a str,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Vec<PromptPart>>> {
        Box::pin(async move {
            let messages = [
                ChatMessage::new("system", system),
                ChatMessage::new("user", user),
            ];
            let rendered = self
                .server()
                .apply_template(&marked_messages(&messages))
                .await?;
            Ok(split_rendered(&rendered, &messages))
        })
    }

    fn sequence(&self) -> Result<Box<dyn AgentSequence>> {
        Ok(Box::new(RemoteSequence {
            model: Lease::on(self.least_busy()),
            tokens: Mutex::new(Vec::new()),
        }))
    }

    fn context_size(&self) -> usize {
        self.servers().map(RemoteModel::n_ctx).min().unwrap_or(0)
    }
}

impl AgentSequence for RemoteSequence {
    fn append<'a>(&'a self, text: &'a str) -> BoxFuture<'a, Result<PrefillStats>> {
        Box::pin(async move {
            let ids = self.model.tokenize(text, self.is_empty(), false).await?;
            Ok(self.extend(&ids))
        })
    }

    fn append_parts<'a>(&'a self, parts: &'a [PromptPart]) -> BoxFuture<'a, Result<PrefillStats>> {
        Box::pin(async move {
            let mut ids = Vec::new();
            let empty = self.is_empty();
            for (i, part) in parts.iter().enumerate() {
                let add_special = empty && i == 0;
                ids.extend(
                    self.model
                        .tokenize(&part.text, add_special, part.special)
                        .await?,
                );
            }
            Ok(self.extend(&ids))
        })
    }

    fn generate<'a>(
        &'a self,
        params: GenerateParams,
        on_piece: &'a mut (dyn FnMut(&str) + Send),
    ) -> BoxFuture<'a, Result<Completion>> {
        Box::pin(async move {
            let prompt = self.snapshot();
            let done = self.model.complete(&prompt, &params, on_piece).await?;
            let total = self.extend(&done.tokens).reused;
            let cached = done.cached_tokens.min(total);
            Ok(Completion {
                text: done.text,
                tokens: done.tokens,
                stop: done.stop,
                prefill: PrefillStats {
                    decoded: total - cached,
                    reused: cached,
                    total,
                },
                prefill_seconds: 0.0,
                generation_seconds: done.seconds,
                sampling_seconds: 0.0,
                drafted: 0,
                accepted: 0,
                logprobs: done.logprobs,
            })
        })
    }

    fn score<'a>(&'a self, candidates: &'a [&'a str]) -> BoxFuture<'a, Result<Vec<f32>>> {
        Box::pin(self.score_candidates(candidates))
    }

    fn settle(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let prompt = self.snapshot();
            if prompt.is_empty() {
                return Ok(());
            }
            // One token generated and dropped: the server decodes the prompt and keeps it.
            let params = GenerateParams {
                max_tokens: 1,
                sampling: Sampling::greedy(),
                ..GenerateParams::default()
            };
            self.model.complete(&prompt, &params, &mut |_| {}).await?;
            Ok(())
        })
    }

    fn fork(&self) -> BoxFuture<'_, Result<Box<dyn AgentSequence>>> {
        Box::pin(async move {
            Ok(Box::new(RemoteSequence {
                model: Lease::on(&self.model.0),
                tokens: Mutex::new(self.snapshot()),
            }) as Box<dyn AgentSequence>)
        })
    }

    fn truncate(&self, len: usize) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.tokens
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .truncate(len);
            Ok(())
        })
    }
}
