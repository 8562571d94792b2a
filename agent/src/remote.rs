//! The agent on a model server ([`RemoteModel`]: llama-server or `geek serve`) instead of the
//! in-process engine.
//!
//! A [`RemoteSequence`] keeps its token ids on this side and sends them whole with every
//! generation; the server's prefix cache decodes only what is new, and the trace counts what
//! the server says it had cached. Forking and truncating are local (copies of the id list).
//! Scoring a candidate asks for one token with the top 20 log-probabilities at each of its
//! token positions: a candidate token outside the top 20 gets the 20th's log-probability (an
//! upper bound), where the in-process engine computes it exactly.

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

/// A model server the agent runs on.
#[derive(Debug, Clone)]
pub struct Remote {
    model: Arc<RemoteModel>,
}

impl Remote {
    /// Wraps a connected server.
    pub fn new(model: RemoteModel) -> Self {
        Remote {
            model: Arc::new(model),
        }
    }

    /// The server.
    pub fn server(&self) -> &RemoteModel {
        &self.model
    }
}

/// A token sequence kept on this side and sent to the server as the prompt.
pub struct RemoteSequence {
    model: Arc<RemoteModel>,
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
        let done = self.model.complete(context, &params).await?;
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
        format!("{} at {}", self.model.name(), self.model.endpoint())
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
                .model
                .apply_template(&marked_messages(&messages))
                .await?;
            Ok(split_rendered(&rendered, &messages))
        })
    }

    fn sequence(&self) -> Result<Box<dyn AgentSequence>> {
        Ok(Box::new(RemoteSequence {
            model: self.model.clone(),
            tokens: Mutex::new(Vec::new()),
        }))
    }

    fn context_size(&self) -> usize {
        self.model.n_ctx()
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
            let done = self.model.complete(&prompt, &params).await?;
            on_piece(&done.text);
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

    fn fork(&self) -> BoxFuture<'_, Result<Box<dyn AgentSequence>>> {
        Box::pin(async move {
            Ok(Box::new(RemoteSequence {
                model: self.model.clone(),
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
