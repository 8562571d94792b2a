//! # geek-agent
//!
//! Gradual knowledge excavation (GEEK, Findings of EMNLP 2023) for implicit yes/no questions,
//! on a local LLM ([`geek_backend`]) and a passage retriever ([`geek_retriever`]).
//!
//! At each step the model chooses one action — **AddDecomp** (write the next sub-question),
//! **Retrieve** (retrieve passages and extract a cited fact), **SelfAnswer** (answer the
//! sub-question itself) or **FinalAnswer** (summarise, then yes/no by comparing the
//! log-probabilities of `" yes"` and `" no"`). Every choice and every line is constrained by a
//! GBNF grammar, so even a 135M model cannot write an unparseable step. The whole excavation
//! of a question lives in one KV-cached sequence per branch (the system prompt is decoded once
//! per [`Excavator`] and forked), so each step decodes only its new tokens; [`Trace::tokens`]
//! proves it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use geek_agent::{Event, Excavator};
//!
//! let engine = geek_backend::Engine::load(geek_backend::EngineConfig::new("model.gguf"))?;
//! let index = geek_retriever::Bm25Index::open(std::path::Path::new("index"))?;
//! let agent = Excavator::builder().backend(engine).retriever(index).explore(3).build()?;
//!
//! let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
//! let printer = tokio::spawn(async move {
//!     while let Some(event) = rx.recv().await {
//!         if let Event::FactExtracted { fact, citations, .. } = event {
//!             println!("fact: {fact} {citations:?}");
//!         }
//!     }
//! });
//! let trace = agent
//!     .run_streaming("Could a llama give birth twice during the Vietnam War?", tx)
//!     .await?;
//! printer.await?;
//! println!("{}", serde_json::to_string_pretty(&trace)?);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod demos;
mod error;
mod excavator;
pub mod model;
pub mod prompts;
pub mod remote;
pub mod scripted;
pub mod trace;
pub mod trajectory;

pub use demos::DemoBank;
pub use error::{Error, Result};
pub use excavator::{Excavator, ExcavatorBuilder, ExcavatorConfig};
pub use model::{AgentModel, AgentSequence, AnswerAdapter};
pub use trace::{
    Action, ActionRecord, ActionTiming, AnswerSource, Branch, Event, FinalAnswer, PassageRef, Step,
    TokenCounts, Trace, TraceConfig,
};
pub use trajectory::{GoldAnswer, GoldStep, TrainingExample, Trajectory};
