//! A scripted model for tests and examples: no weights, deterministic answers chosen by a
//! function of the transcript. Tokens are counted as characters.
//!
//! ```
//! use geek_agent::scripted::ScriptedModel;
//! let model = ScriptedModel::new(|transcript, _params| {
//!     if transcript.ends_with("Action:") { " FinalAnswer\n".into() } else { " It is.\n".into() }
//! });
//! # let _ = model;
//! ```

use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use geek_backend::{Completion, GenerateParams, PrefillStats, PromptPart, StopReason};

use crate::model::{AgentModel, AgentSequence};
use crate::Result;

type Respond = dyn Fn(&str, &GenerateParams) -> String + Send + Sync;
type Score = dyn Fn(&str, &[&str]) -> Vec<f32> + Send + Sync;

/// A model whose generations are `respond(transcript, params)`, cut at the first stop string
/// (kept in the transcript, as the real backend keeps it) or at `4 × max_tokens` characters.
#[derive(Clone)]
pub struct ScriptedModel {
    respond: Arc<Respond>,
    score: Arc<Score>,
    context: usize,
}

impl ScriptedModel {
    /// Scores favour `" yes"` unless changed with [`with_scores`](Self::with_scores).
    pub fn new(respond: impl Fn(&str, &GenerateParams) -> String + Send + Sync + 'static) -> Self {
        ScriptedModel {
            respond: Arc::new(respond),
            score: Arc::new(|_, cands| {
                cands
                    .iter()
                    .map(|c| if c.trim() == "yes" { -0.1 } else { -2.0 })
                    .collect()
            }),
            context: 1 << 20,
        }
    }

    /// Log-probabilities of candidates as a function of the transcript.
    pub fn with_scores(
        mut self,
        score: impl Fn(&str, &[&str]) -> Vec<f32> + Send + Sync + 'static,
    ) -> Self {
        self.score = Arc::new(score);
        self
    }

    /// The context size reported to the agent.
    pub fn with_context(mut self, chars: usize) -> Self {
        self.context = chars;
        self
    }
}

impl AgentModel for ScriptedModel {
    fn describe(&self) -> String {
        "scripted".into()
    }

    fn chat_prompt<'a>(
        &'a self,
        system: &'a str,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Vec<PromptPart>>> {
        Box::pin(async move {
            Ok(vec![
                PromptPart::template("<system>"),
                PromptPart::content(system),
                PromptPart::template("</system>\n<user>"),
                PromptPart::content(user),
                PromptPart::template("</user>\n"),
            ])
        })
    }

    fn sequence(&self) -> Result<Box<dyn AgentSequence>> {
        Ok(Box::new(ScriptedSequence {
            model: self.clone(),
            text: Mutex::new(String::new()),
        }))
    }

    fn context_size(&self) -> usize {
        self.context
    }
}

struct ScriptedSequence {
    model: ScriptedModel,
    text: Mutex<String>,
}

impl ScriptedSequence {
    fn text(&self) -> std::sync::MutexGuard<'_, String> {
        self.text.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl AgentSequence for ScriptedSequence {
    fn append<'a>(&'a self, text: &'a str) -> BoxFuture<'a, Result<PrefillStats>> {
        Box::pin(async move {
            let mut t = self.text();
            let reused = t.chars().count();
            t.push_str(text);
            let total = t.chars().count();
            Ok(PrefillStats {
                decoded: total - reused,
                reused,
                total,
            })
        })
    }

    fn append_parts<'a>(&'a self, parts: &'a [PromptPart]) -> BoxFuture<'a, Result<PrefillStats>> {
        Box::pin(async move {
            let text: String = parts.iter().map(|p| p.text.as_str()).collect();
            self.append(&text).await
        })
    }

    fn generate<'a>(
        &'a self,
        params: GenerateParams,
        on_piece: &'a mut (dyn FnMut(&str) + Send),
    ) -> BoxFuture<'a, Result<Completion>> {
        Box::pin(async move {
            let transcript = self.text().clone();
            let full = (self.model.respond)(&transcript, &params);
            // A token is taken to be four characters for `max_tokens`.
            let mut kept: String = full.chars().take(params.max_tokens * 4).collect();
            let mut stop = if kept.chars().count() < full.chars().count() {
                StopReason::MaxTokens
            } else {
                StopReason::Eos
            };
            let mut shown = kept.clone();
            if let Some((at, s)) = params
                .stop
                .iter()
                .filter_map(|s| kept.find(s.as_str()).map(|at| (at, s.clone())))
                .min_by_key(|(at, _)| *at)
            {
                shown = kept[..at].to_string();
                kept.truncate(at + s.len());
                stop = StopReason::Stop(s);
            }
            on_piece(&shown);
            let mut t = self.text();
            let before = t.chars().count();
            t.push_str(&kept);
            Ok(Completion {
                text: shown,
                tokens: kept.chars().map(|c| c as i32).collect(),
                stop,
                prefill: PrefillStats {
                    decoded: 0,
                    reused: before,
                    total: before,
                },
                prefill_seconds: 0.0,
                generation_seconds: 0.0,
                sampling_seconds: 0.0,
                drafted: 0,
                accepted: 0,
                logprobs: Vec::new(),
            })
        })
    }

    fn score<'a>(&'a self, candidates: &'a [&'a str]) -> BoxFuture<'a, Result<Vec<f32>>> {
        Box::pin(async move { Ok((self.model.score)(&self.text(), candidates)) })
    }

    fn fork(&self) -> BoxFuture<'_, Result<Box<dyn AgentSequence>>> {
        Box::pin(async move {
            Ok(Box::new(ScriptedSequence {
                model: self.model.clone(),
                text: Mutex::new(self.text().clone()),
            }) as Box<dyn AgentSequence>)
        })
    }

    fn truncate(&self, len: usize) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mut t = self.text();
            let cut: String = t.chars().take(len).collect();
            *t = cut;
            Ok(())
        })
    }
}
