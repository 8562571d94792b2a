//! What the loop needs from a language model, as two small traits, and their implementation on
//! the llama.cpp [`Engine`]. Tests implement them with a scripted model.

use futures::future::BoxFuture;
use geek_backend::{
    ChatMessage, Completion, Engine, GenEvent, GenerateParams, PrefillStats, PromptPart, Sequence,
};

use std::path::Path;

use crate::Result;

/// A model the excavation can run on.
pub trait AgentModel: Send + Sync {
    /// A description for traces (model file or name).
    fn describe(&self) -> String;

    /// Renders a system + user chat with the model's template, opened for the assistant: the
    /// template's text (special-token markers parsed) and the two messages as content parts.
    fn chat_prompt<'a>(
        &'a self,
        system: &'a str,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Vec<PromptPart>>>;

    /// A new, empty sequence.
    fn sequence(&self) -> Result<Box<dyn AgentSequence>>;

    /// A new, empty sequence for a final yes/no answer (the agent's final answer, a
    /// baseline's whole transcript): on the answer adapter of an [`AnswerAdapter`], else as
    /// [`sequence`](Self::sequence).
    fn answer_sequence(&self) -> BoxFuture<'_, Result<Box<dyn AgentSequence>>> {
        Box::pin(async move { self.sequence() })
    }

    /// Tokens one sequence may hold.
    fn context_size(&self) -> usize;

    /// What a saved sequence state depends on (model file and cache layout), when sequences
    /// can be saved and loaded; `None` otherwise.
    fn state_key(&self) -> Option<String> {
        None
    }
}

/// A KV-cached token sequence of an [`AgentModel`].
pub trait AgentSequence: Send + Sync {
    /// Appends plain text (special-token markers in it stay text), decoding only the new tokens.
    fn append<'a>(&'a self, text: &'a str) -> BoxFuture<'a, Result<PrefillStats>>;

    /// Appends prompt parts from [`AgentModel::chat_prompt`].
    fn append_parts<'a>(&'a self, parts: &'a [PromptPart]) -> BoxFuture<'a, Result<PrefillStats>>;

    /// Generates after the sequence; `on_piece` sees the text as it streams.
    fn generate<'a>(
        &'a self,
        params: GenerateParams,
        on_piece: &'a mut (dyn FnMut(&str) + Send),
    ) -> BoxFuture<'a, Result<Completion>>;

    /// Log-probabilities of candidate continuations.
    fn score<'a>(&'a self, candidates: &'a [&'a str]) -> BoxFuture<'a, Result<Vec<f32>>>;

    /// A copy sharing the cache.
    fn fork(&self) -> BoxFuture<'_, Result<Box<dyn AgentSequence>>>;

    /// Keeps the first `len` tokens.
    fn truncate(&self, len: usize) -> BoxFuture<'_, Result<()>>;

    /// Makes sure what was appended is decoded where the model runs. In process, appending
    /// decodes; a remote sequence sends its tokens with the next request, so this asks the
    /// server to decode them now, on their own — as the in-process engine decodes the shared
    /// system prompt — which keeps later answers closer to the in-process ones.
    fn settle(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    /// Saves the sequence's state to `path` (models whose [`AgentModel::state_key`] is set).
    fn save_state<'a>(&'a self, path: &'a Path) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            Err(crate::Error::Config(format!(
                "this model cannot save states ({})",
                path.display()
            )))
        })
    }

    /// Loads a state saved by [`save_state`](Self::save_state) into this empty sequence;
    /// returns its number of tokens.
    fn load_state<'a>(&'a self, path: &'a Path) -> BoxFuture<'a, Result<usize>> {
        Box::pin(async move {
            Err(crate::Error::Config(format!(
                "this model cannot load states ({})",
                path.display()
            )))
        })
    }
}

impl AgentModel for Engine {
    fn describe(&self) -> String {
        let info = self.info();
        format!(
            "{} ({}, {:.0}M parameters)",
            info.path.display(),
            info.architecture,
            info.n_params as f64 / 1e6
        )
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
            match Engine::chat_parts(self, &messages, true).await {
                Ok(p) => Ok(p),
                // A base model without a template gets a plain transcript.
                Err(geek_backend::Error::ChatTemplate(_)) => Ok(vec![
                    PromptPart::content(system),
                    PromptPart::content("\n\n"),
                    PromptPart::content(user),
                    PromptPart::content("\n"),
                ]),
                Err(e) => Err(e.into()),
            }
        })
    }

    fn sequence(&self) -> Result<Box<dyn AgentSequence>> {
        Ok(Box::new(Engine::sequence(self)?))
    }

    fn context_size(&self) -> usize {
        self.info().n_ctx as usize
    }

    fn state_key(&self) -> Option<String> {
        let info = self.info();
        let sha = geek_backend::catalog::sha256_cached(&info.path).ok()?;
        // The KV state depends on the weights: the active LoRA's file and scale, if any.
        let lora = match self.active_lora() {
            Some((path, scale)) => {
                let lora_sha = geek_backend::catalog::sha256_cached(&path).ok()?;
                format!("lora:{lora_sha}@{scale}")
            }
            None => "base".to_string(),
        };
        Some(format!("{sha}:{:?}:{lora}", info.kv_type))
    }
}

impl AgentSequence for Sequence {
    fn append<'a>(&'a self, text: &'a str) -> BoxFuture<'a, Result<PrefillStats>> {
        Box::pin(async move { Ok(Sequence::append_text(self, text).await?) })
    }

    fn append_parts<'a>(&'a self, parts: &'a [PromptPart]) -> BoxFuture<'a, Result<PrefillStats>> {
        Box::pin(async move { Ok(Sequence::append_parts(self, parts.to_vec()).await?) })
    }

    fn generate<'a>(
        &'a self,
        params: GenerateParams,
        on_piece: &'a mut (dyn FnMut(&str) + Send),
    ) -> BoxFuture<'a, Result<Completion>> {
        Box::pin(async move {
            let mut stream = Sequence::generate(self, params);
            while let Some(event) = stream.next().await {
                match event {
                    GenEvent::Piece(p) => on_piece(&p),
                    GenEvent::Done(c) => return Ok(c),
                    GenEvent::Failed(e) => return Err(e.into()),
                }
            }
            Err(geek_backend::Error::EngineStopped.into())
        })
    }

    fn score<'a>(&'a self, candidates: &'a [&'a str]) -> BoxFuture<'a, Result<Vec<f32>>> {
        Box::pin(async move { Ok(Sequence::score(self, candidates).await?) })
    }

    fn fork(&self) -> BoxFuture<'_, Result<Box<dyn AgentSequence>>> {
        Box::pin(async move {
            let child = Sequence::fork(self).await?;
            Ok(Box::new(child) as Box<dyn AgentSequence>)
        })
    }

    fn truncate(&self, len: usize) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { Ok(Sequence::truncate(self, len).await?) })
    }

    fn save_state<'a>(&'a self, path: &'a Path) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            Sequence::save_state(self, path).await?;
            Ok(())
        })
    }

    fn load_state<'a>(&'a self, path: &'a Path) -> BoxFuture<'a, Result<usize>> {
        Box::pin(async move { Ok(Sequence::load_state(self, path).await?) })
    }
}

/// An [`Engine`] whose final yes/no answers run on one of its LoRA adapters while everything
/// else — sub-questions, extraction, self-answers — runs on the engine's own weights. An
/// adapter trained on final answers only (`geek data trajectories --render final-answer`)
/// then answers where it was trained and leaves the excavation steps to the model they were
/// written for. The engine's sequences are batched apart by adapter
/// ([`Sequence::set_lora`]).
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use geek_agent::{AnswerAdapter, Excavator};
/// use geek_backend::{Engine, EngineConfig};
///
/// // The adapter is loaded with the model but not switched on for the whole engine.
/// let engine = Engine::load(EngineConfig::new("model.gguf").with_lora("final-answer.gguf"))?;
/// let agent = Excavator::builder()
///     .backend(AnswerAdapter::new(engine, 0, 1.0)?)
///     .build()?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct AnswerAdapter {
    engine: Engine,
    lora: (usize, f32),
}

impl AnswerAdapter {
    /// Answers on adapter `index` of the engine's [`lora_adapters`](geek_backend::ModelInfo::lora_adapters)
    /// at `scale`; an index the engine did not load is a configuration error.
    pub fn new(engine: Engine, index: usize, scale: f32) -> Result<Self> {
        let loaded = engine.info().lora_adapters.len();
        if index >= loaded {
            return Err(crate::Error::Config(format!(
                "no LoRA adapter {index} to answer with: the engine loaded {loaded}"
            )));
        }
        Ok(AnswerAdapter {
            engine,
            lora: (index, scale),
        })
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The answer adapter's file and scale.
    pub fn adapter(&self) -> (std::path::PathBuf, f32) {
        let (index, scale) = self.lora;
        (self.engine.info().lora_adapters[index].clone(), scale)
    }
}

impl AgentModel for AnswerAdapter {
    fn describe(&self) -> String {
        let (path, scale) = self.adapter();
        format!(
            "{}, answering on LoRA {} (scale {scale})",
            AgentModel::describe(&self.engine),
            path.display()
        )
    }

    fn chat_prompt<'a>(
        &'a self,
        system: &'a str,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Vec<PromptPart>>> {
        AgentModel::chat_prompt(&self.engine, system, user)
    }

    fn sequence(&self) -> Result<Box<dyn AgentSequence>> {
        AgentModel::sequence(&self.engine)
    }

    fn answer_sequence(&self) -> BoxFuture<'_, Result<Box<dyn AgentSequence>>> {
        Box::pin(async move {
            let seq = Engine::sequence(&self.engine)?;
            seq.set_lora(Some(self.lora)).await?;
            Ok(Box::new(seq) as Box<dyn AgentSequence>)
        })
    }

    fn context_size(&self) -> usize {
        AgentModel::context_size(&self.engine)
    }

    fn state_key(&self) -> Option<String> {
        // Saved states are of excavation sequences: the engine's weights.
        AgentModel::state_key(&self.engine)
    }
}
