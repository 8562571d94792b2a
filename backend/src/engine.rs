//! The handle side of the inference engine: [`Engine`], [`Sequence`] and what they return.
//!
//! One thread owns the llama.cpp model and context (see `worker.rs`); everything here talks to
//! it over a channel. Every call returns at once with a [`Reply`] (or a [`Generation`] stream)
//! that can be `.await`ed from async code or `.wait()`ed from a plain thread.
//!
//! ```no_run
//! use geek_backend::{Engine, EngineConfig, GenerateParams};
//!
//! let engine = Engine::load(EngineConfig::new("SmolLM2-135M-Instruct.Q4_1.gguf"))?;
//! let seq = engine.sequence()?;
//! seq.append("The capital of France is").wait()?;
//! // Only the new tokens are decoded: the prompt stays in the KV cache.
//! let scores = seq.score(&[" Paris", " Berlin"]).wait()?;
//! assert!(scores[0] > scores[1]);
//! let answer = seq.generate(GenerateParams::greedy(16).stop_at("\n")).wait()?;
//! println!("{}", answer.text);
//! # Ok::<(), geek_backend::Error>(())
//! ```

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{mpsc, Arc};
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::gguf::GgufFile;
use crate::protocol::{Command, Input, ReplyTx, SeqIds};
use crate::sampling::GenerateParams;
use crate::types::{
    ChatMessage, Completion, EngineStats, GenEvent, ModelInfo, PrefillStats, PromptPart,
};
use crate::{EngineConfig, Error, Result};

struct Shared {
    tx: Option<mpsc::Sender<Command>>,
    ids: Arc<SeqIds>,
    active_lora: crate::worker::ActiveLora,
    info: ModelInfo,
    thread: Option<JoinHandle<()>>,
}

impl Shared {
    fn send(&self, cmd: Command) {
        // A send error means the worker is gone; the dropped reply sender then reports
        // `EngineStopped` to whoever waits.
        if let Some(tx) = &self.tx {
            let _ = tx.send(cmd);
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Closing the channel ends the worker loop; wait so the model is freed before we return.
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A loaded model with its llama.cpp context, owned by one engine thread. Cheap to clone;
/// the engine stops when the last clone and the last [`Sequence`] are dropped.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.shared.info.path)
            .finish()
    }
}

impl Engine {
    /// Loads the model on a new engine thread. The file is checked first, so a missing, non-GGUF,
    /// truncated or unsupported file gives a typed error instead of a llama.cpp failure.
    pub fn load(config: EngineConfig) -> Result<Engine> {
        let gguf = GgufFile::open(&config.model)?;
        gguf.check_architecture()?;
        for adapter in &config.lora_adapters {
            GgufFile::open(adapter)?;
        }
        if config.n_ctx == 0 || config.n_batch == 0 || config.threads <= 0 {
            return Err(Error::InvalidParameter(
                "n_ctx, n_batch and threads must be positive".into(),
            ));
        }
        if config.max_sequences == 0 || config.max_sequences > 256 {
            return Err(Error::InvalidParameter(
                "max_sequences must be between 1 and 256".into(),
            ));
        }
        check_kv_memory(&gguf, &config)?;
        let ids = Arc::new(SeqIds::new(config.max_sequences));
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let worker_ids = ids.clone();
        let active_lora = crate::worker::ActiveLora::default();
        let worker_lora = active_lora.clone();
        let thread = std::thread::Builder::new()
            .name("geek-engine".into())
            .spawn(move || crate::worker::run(config, gguf, worker_ids, worker_lora, rx, ready_tx))
            .map_err(|e| Error::ModelLoad {
                path: PathBuf::new(),
                reason: format!("cannot start the engine thread: {e}"),
            })?;
        let info = match ready_rx.recv() {
            Ok(Ok(info)) => info,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(Error::EngineStopped);
            }
        };
        Ok(Engine {
            shared: Arc::new(Shared {
                tx: Some(tx),
                ids,
                active_lora,
                info,
                thread: Some(thread),
            }),
        })
    }

    /// Facts about the loaded model.
    pub fn info(&self) -> &ModelInfo {
        &self.shared.info
    }

    /// A new, empty sequence with its own KV cache.
    pub fn sequence(&self) -> Result<Sequence> {
        Ok(Sequence {
            id: self.shared.ids.alloc()?,
            shared: self.shared.clone(),
        })
    }

    /// Tokenizes `text`; `add_special` adds the BOS token when the model wants one.
    /// Special tokens written in the text (`<|im_start|>`) are parsed as such.
    pub fn tokenize(&self, text: impl Into<String>, add_special: bool) -> Reply<Vec<i32>> {
        self.tokenize_with(text, add_special, true)
    }

    /// Tokenizes `text`; `parse_special: false` keeps special-token markers as text (how
    /// [`Sequence::append_text`] tokenizes).
    pub fn tokenize_with(
        &self,
        text: impl Into<String>,
        add_special: bool,
        parse_special: bool,
    ) -> Reply<Vec<i32>> {
        self.request(|reply| Command::Tokenize {
            text: text.into(),
            add_special,
            parse_special,
            reply,
        })
    }

    /// Log-probability of each next token of `tokens` given the ones before it:
    /// `log p(tokens[i+1] | tokens[..=i])` for `i` in `from..len-1`. Evaluated on a scratch
    /// sequence of its own in `n_batch` chunks and then dropped (nothing stays cached); the
    /// other sequences wait meanwhile. This is what perplexity is computed from.
    pub fn token_log_probs(&self, tokens: Vec<i32>, from: usize) -> Reply<Vec<f32>> {
        self.request(|reply| Command::TokenLogProbs {
            tokens,
            from,
            reply,
        })
    }

    /// Turns tokens back into text (special tokens rendered).
    pub fn detokenize(&self, tokens: Vec<i32>) -> Reply<String> {
        self.request(|reply| Command::Detokenize { tokens, reply })
    }

    /// Renders messages with the chat template stored in the model's GGUF metadata.
    pub fn chat_prompt(&self, messages: &[ChatMessage], add_assistant: bool) -> Reply<String> {
        let messages = messages.to_vec();
        self.request(|reply| Command::ChatPrompt {
            messages,
            add_assistant,
            reply,
        })
    }

    /// Like [`chat_prompt`](Self::chat_prompt), split into the template's own text and the
    /// messages' contents, so that [`Sequence::append_parts`] parses special-token markers in
    /// the template only: a question or passage that contains `<|im_end|>` stays text.
    pub fn chat_parts(
        &self,
        messages: &[ChatMessage],
        add_assistant: bool,
    ) -> Reply<Vec<PromptPart>> {
        let messages = messages.to_vec();
        self.request(|reply| Command::ChatParts {
            messages,
            add_assistant,
            reply,
        })
    }

    /// Switches to LoRA adapter `index` of [`EngineConfig::lora_adapters`] at `scale`, or back to
    /// the base model with `None`, for every sequence not pinned by [`Sequence::set_lora`]. The
    /// KV caches of those sequences were computed with other weights, so they are cleared and
    /// re-decoded on next use. Fails while requests run.
    pub fn set_lora(&self, index: Option<usize>, scale: f32) -> Reply<()> {
        self.request(|reply| Command::SetLora {
            index,
            scale,
            reply,
        })
    }

    /// The LoRA adapter switched on by [`Engine::set_lora`] (its file) and its scale.
    pub fn active_lora(&self) -> Option<(PathBuf, f32)> {
        let active = *self
            .shared
            .active_lora
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (index, scale) = active?;
        Some((self.shared.info.lora_adapters.get(index)?.clone(), scale))
    }

    /// The engine's counters.
    pub fn stats(&self) -> Reply<EngineStats> {
        self.request(|reply| Command::Stats { reply })
    }

    fn request<T>(&self, make: impl FnOnce(ReplyTx<T>) -> Command) -> Reply<T> {
        request(&self.shared, make)
    }
}

/// Refuses a context whose KV cache cannot fit in this machine's memory, before llama.cpp
/// spends a minute trying to allocate it.
fn check_kv_memory(gguf: &GgufFile, config: &EngineConfig) -> Result<()> {
    let Some(bytes) = gguf.kv_cache_bytes(config.n_ctx as u64, config.kv_type.bytes()) else {
        return Ok(());
    };
    let Some(memory) = total_memory() else {
        return Ok(());
    };
    if bytes > memory {
        return Err(Error::InvalidParameter(format!(
            "a context of {} tokens needs a {:.1} GiB KV cache for this model, more than this machine's {:.1} GiB of memory; use a smaller --n-ctx",
            config.n_ctx,
            bytes as f64 / (1u64 << 30) as f64,
            memory as f64 / (1u64 << 30) as f64
        )));
    }
    Ok(())
}

/// Physical memory in bytes (Linux), when known.
fn total_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn request<T>(shared: &Shared, make: impl FnOnce(ReplyTx<T>) -> Command) -> Reply<T> {
    let (tx, rx) = oneshot::channel();
    shared.send(make(tx));
    Reply { rx }
}

/// A token sequence whose KV cache lives in the engine. Appends decode only the new tokens;
/// [`fork`](Sequence::fork) shares the cache with a copy. One request at a time per sequence:
/// a second one while the first runs fails with [`Error::SequenceBusy`]. Dropping the handle
/// frees the cache (and cancels a running request).
pub struct Sequence {
    id: i32,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Sequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequence").field("id", &self.id).finish()
    }
}

impl Sequence {
    /// The llama.cpp sequence id.
    pub fn id(&self) -> i32 {
        self.id
    }

    /// Appends text and decodes its tokens. The first append of a sequence adds BOS when the
    /// model wants one; special-token markers in the text are parsed (for text that is a
    /// template or a raw prompt; use [`append_text`](Self::append_text) for anything else).
    pub fn append(&self, text: impl Into<String>) -> Reply<PrefillStats> {
        self.append_parts(vec![PromptPart::template(text)])
    }

    /// Appends text as plain text: special-token markers in it are not parsed. This is how
    /// retrieved passages, questions and other text from outside are appended.
    pub fn append_text(&self, text: impl Into<String>) -> Reply<PrefillStats> {
        self.append_parts(vec![PromptPart::content(text)])
    }

    /// Appends prompt parts (see [`Engine::chat_parts`]) and decodes their tokens.
    pub fn append_parts(&self, parts: Vec<PromptPart>) -> Reply<PrefillStats> {
        let input = Input::Parts(parts);
        self.request(|reply| Command::Append {
            seq: self.id,
            input,
            reply,
        })
    }

    /// Appends tokens as they are and decodes them.
    pub fn append_tokens(&self, tokens: Vec<i32>) -> Reply<PrefillStats> {
        self.request(|reply| Command::Append {
            seq: self.id,
            input: Input::Tokens(tokens),
            reply,
        })
    }

    /// Generates a continuation, streamed. The generated tokens stay in the sequence.
    pub fn generate(&self, params: GenerateParams) -> Generation {
        let (events, rx) = tmpsc::unbounded_channel();
        self.shared.send(Command::Generate {
            seq: self.id,
            params: Box::new(params),
            events,
        });
        Generation { rx }
    }

    /// Log-probability of each candidate continuation after the sequence (summed over its
    /// tokens), without generating and without changing the sequence.
    pub fn score(&self, candidates: &[&str]) -> Reply<Vec<f32>> {
        let candidates = candidates.iter().map(|c| c.to_string()).collect();
        self.request(|reply| Command::Score {
            seq: self.id,
            candidates,
            reply,
        })
    }

    /// The next-token logits after the sequence (vocabulary-sized).
    pub fn logits(&self) -> Reply<Vec<f32>> {
        self.request(|reply| Command::Logits {
            seq: self.id,
            reply,
        })
    }

    /// The sequence's tokens (decoded or waiting to be).
    pub fn tokens(&self) -> Reply<Vec<i32>> {
        self.request(|reply| Command::Tokens {
            seq: self.id,
            reply,
        })
    }

    /// Saves the sequence (its tokens and KV cache cells) to `path`, so that a later engine on
    /// the same model and settings can [`load_state`](Self::load_state) it instead of decoding
    /// it again. Returns the bytes written.
    pub fn save_state(&self, path: impl Into<std::path::PathBuf>) -> Reply<usize> {
        let path = path.into();
        self.request(|reply| Command::SaveState {
            seq: self.id,
            path,
            reply,
        })
    }

    /// Loads a state saved by [`save_state`](Self::save_state) into this empty sequence;
    /// returns its number of tokens.
    pub fn load_state(&self, path: impl Into<std::path::PathBuf>) -> Reply<usize> {
        let path = path.into();
        self.request(|reply| Command::LoadState {
            seq: self.id,
            path,
            reply,
        })
    }

    /// Keeps only the first `len` tokens, dropping the rest from the KV cache.
    pub fn truncate(&self, len: usize) -> Reply<()> {
        self.request(|reply| Command::Truncate {
            seq: self.id,
            len,
            reply,
        })
    }

    /// Pins this sequence to LoRA adapter `index` of [`EngineConfig::lora_adapters`] at
    /// `scale` (`Some((index, scale))`), or to the base model (`None`), whichever adapter
    /// [`Engine::set_lora`] switches on for the other sequences — as llama-server applies
    /// adapters per request. Sequences on different adapters are decoded in separate batches,
    /// their turns alternating. The sequence's cache is cleared when its weights change; forks
    /// keep the pin. Fails while a request of this sequence runs.
    pub fn set_lora(&self, lora: Option<(usize, f32)>) -> Reply<()> {
        let seq = self.id;
        self.request(|reply| Command::PinLora { seq, lora, reply })
    }

    /// A new sequence that starts as a copy of this one and shares its KV cache cells:
    /// nothing is decoded again.
    pub fn fork(&self) -> Fork {
        match self.shared.ids.alloc() {
            Err(e) => Fork {
                state: ForkState::Failed(Some(e)),
            },
            Ok(dst) => {
                let child = Sequence {
                    id: dst,
                    shared: self.shared.clone(),
                };
                let reply = self.request(|reply| Command::Fork {
                    src: self.id,
                    dst,
                    reply,
                });
                Fork {
                    state: ForkState::Waiting(reply, Some(child)),
                }
            }
        }
    }

    fn request<T>(&self, make: impl FnOnce(ReplyTx<T>) -> Command) -> Reply<T> {
        request(&self.shared, make)
    }
}

impl Drop for Sequence {
    fn drop(&mut self) {
        self.shared.send(Command::Release { seq: self.id });
        // The release is queued before any later use of the id, so it can be reused now.
        self.shared.ids.release(self.id);
    }
}

/// The answer to one request. `.await` it, or `.wait()` from a thread that is not running an
/// async runtime.
#[must_use = "a Reply does nothing unless awaited or waited on"]
#[derive(Debug)]
pub struct Reply<T> {
    rx: oneshot::Receiver<Result<T>>,
}

impl<T> Reply<T> {
    /// Blocks the current thread until the engine answers. Panics inside an async runtime.
    pub fn wait(self) -> Result<T> {
        self.rx.blocking_recv().unwrap_or(Err(Error::EngineStopped))
    }
}

impl<T> Future for Reply<T> {
    type Output = Result<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(Error::EngineStopped)))
    }
}

enum ForkState {
    Waiting(Reply<()>, Option<Sequence>),
    Failed(Option<Error>),
}

/// The answer to [`Sequence::fork`]: the new sequence.
#[must_use = "a Fork does nothing unless awaited or waited on"]
pub struct Fork {
    state: ForkState,
}

impl Fork {
    /// Blocks until the copy is made.
    pub fn wait(self) -> Result<Sequence> {
        match self.state {
            ForkState::Failed(e) => Err(e.unwrap_or(Error::EngineStopped)),
            ForkState::Waiting(reply, child) => {
                reply.wait()?;
                child.ok_or(Error::EngineStopped)
            }
        }
    }
}

impl Future for Fork {
    type Output = Result<Sequence>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            ForkState::Failed(e) => Poll::Ready(Err(e.take().unwrap_or(Error::EngineStopped))),
            ForkState::Waiting(reply, child) => match Pin::new(reply).poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => Poll::Ready(child.take().ok_or(Error::EngineStopped)),
            },
        }
    }
}

/// A streamed generation. Dropping it cancels the generation.
#[must_use = "a Generation is cancelled when dropped"]
#[derive(Debug)]
pub struct Generation {
    rx: tmpsc::UnboundedReceiver<GenEvent>,
}

impl Generation {
    /// The next event; `None` after `Done` or `Failed`.
    pub async fn next(&mut self) -> Option<GenEvent> {
        self.rx.recv().await
    }

    /// The next event, blocking the current thread.
    pub fn next_blocking(&mut self) -> Option<GenEvent> {
        self.rx.blocking_recv()
    }

    /// Waits for the end, ignoring the streamed pieces.
    pub async fn finish(mut self) -> Result<Completion> {
        while let Some(ev) = self.rx.recv().await {
            if let Some(done) = Self::terminal(ev) {
                return done;
            }
        }
        Err(Error::EngineStopped)
    }

    /// Blocks until the end, ignoring the streamed pieces.
    pub fn wait(mut self) -> Result<Completion> {
        while let Some(ev) = self.rx.blocking_recv() {
            if let Some(done) = Self::terminal(ev) {
                return done;
            }
        }
        Err(Error::EngineStopped)
    }

    fn terminal(ev: GenEvent) -> Option<Result<Completion>> {
        match ev {
            GenEvent::Piece(_) => None,
            GenEvent::Done(c) => Some(Ok(c)),
            GenEvent::Failed(e) => Some(Err(e)),
        }
    }
}
