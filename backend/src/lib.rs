//! # geek-backend
//!
//! LLM inference for geek: a GGUF model run in process by llama.cpp (through `llama-cpp-2`).
//!
//! One engine thread owns the model and its context; [`Engine`] and [`Sequence`] are handles
//! that send it requests and get [`Reply`]s or streamed [`Generation`]s back, usable from
//! async code (`.await`) and from plain threads (`.wait()`).
//!
//! What the excavation agent needs from a model, and what this crate gives it:
//! - **KV-cache reuse.** A [`Sequence`] keeps its tokens in the cache; [`Sequence::append`]
//!   decodes only the new ones, and [`PrefillStats`] / [`EngineStats`] count what was decoded
//!   against what a stateless API would have re-sent.
//! - **Branching.** [`Sequence::fork`] copies a sequence by sharing its cache cells.
//! - **Batching.** Requests on different sequences that run at the same time are decoded
//!   together in one `llama_batch`.
//! - **Controlled output.** Greedy or seeded sampling, stop strings, UTF-8-safe streaming and
//!   GBNF grammars ([`GenerateParams`]).
//! - **Scoring.** [`Sequence::score`] gives log-probabilities of candidate continuations
//!   (`" yes"` against `" no"`) without generating.
//! - **Adapters.** GGUF LoRA adapters loaded with the model and switched at run time.
//!
//! The `cuda` feature builds llama.cpp with CUDA; the API is the same either way
//! (offload with [`EngineConfig::n_gpu_layers`]).
//!
//! ## Example
//! ```no_run
//! use geek_backend::{Engine, EngineConfig, GenerateParams};
//!
//! let engine = Engine::load(EngineConfig::new("model.gguf").with_threads(2))?;
//! let prompt = engine
//!     .chat_prompt(&[geek_backend::ChatMessage::new("user", "Name a planet.")], true)
//!     .wait()?;
//! let seq = engine.sequence()?;
//! seq.append(prompt).wait()?;
//! let mut stream = seq.generate(GenerateParams::greedy(32));
//! while let Some(event) = stream.next_blocking() {
//!     match event {
//!         geek_backend::GenEvent::Piece(text) => print!("{text}"),
//!         geek_backend::GenEvent::Done(done) => println!("\n[{:?}]", done.stop),
//!         geek_backend::GenEvent::Failed(err) => return Err(err),
//!     }
//! }
//! # Ok::<(), geek_backend::Error>(())
//! ```
#![warn(missing_docs)]

mod arch;
pub mod bench;
pub mod catalog;
mod config;
mod engine;
mod error;
pub mod gguf;
mod llama_log;
pub mod paths;
pub mod perplexity;
mod protocol;
pub mod remote;
mod sampling;
mod text;
mod types;
mod worker;

pub use arch::SUPPORTED_ARCHITECTURES;
pub use config::{default_threads, EngineConfig, FlashAttention, KvType, DEFAULT_LOOKUP_DRAFT};
pub use engine::{Engine, Fork, Generation, Reply, Sequence};
pub use error::{Error, Result};
pub use sampling::{GenerateParams, Sampling};
pub use types::{
    marked_messages, split_rendered, ChatMessage, Completion, EngineStats, GenEvent, ModelInfo,
    PrefillStats, PromptPart, StopReason, TokenLogprob,
};
