//! # geek-compress
//!
//! Produces the agent's model. This crate runs the llama transformer in `candle` on CPU with a
//! frozen base and trainable adapters, trains them on (prompt, completion) JSONL, merges them,
//! quantizes the result — by round-to-nearest ([`quantize`]) or with scales learned by
//! distillation from the full-precision model ([`distill`], QuantGPT) — and writes GGUF files
//! the backend (stock llama.cpp) loads.
//!
//! ```no_run
//! use geek_compress::{AdaptedModel, AdapterConfig, AdapterKind, BaseWeights};
//!
//! # fn main() -> geek_compress::Result<()> {
//! // Dequantize the shipped SmolLM2 GGUF to f32 and put LoRA (r = 16, α = 32) on all seven
//! // linear layers of every block.
//! let base = BaseWeights::load("SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let model = AdaptedModel::new(&base, Some(&AdapterConfig::new(AdapterKind::Lora)))?;
//! println!("{} trainable weights", model.trainable_parameters());
//! // Next-token logits for every position of a token sequence.
//! let logits = model.sequence_logits(&[1, 2, 3])?;
//! assert_eq!(logits.dims(), &[3, base.config.n_vocab]);
//! # Ok(()) }
//! ```
//!
//! Learned 4-bit quantization of the same model, trained on a few calibration rows:
//!
//! ```no_run
//! use geek_compress::distill::{learn, LearnedConfig};
//! use geek_compress::quantize::QuantType;
//! use geek_compress::BaseWeights;
//!
//! # fn main() -> geek_compress::Result<()> {
//! let base = BaseWeights::load("SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! // Token rows of one length, from the model's own tokenizer (see `distill::calibration_rows`).
//! let rows: Vec<Vec<u32>> = vec![vec![1; 256]; 8];
//! let config = LearnedConfig { ty: QuantType::Q4_0, steps: 30, ..LearnedConfig::default() };
//! // No checkpoint directory: nothing to resume, nothing saved.
//! let (model, summary) = learn(&base, &rows, &config, None, &mut |_event| {})?;
//! println!("held-out KL {:.3} -> {:.3}", summary.initial_kl, summary.final_kl);
//! model.write_gguf(&base, "model-q4_0.gguf".as_ref())?;
//! # Ok(()) }
//! ```
//!
//! Adapters: [`AdapterKind::Lora`], [`AdapterKind::Moslora`] (a learnable r×r mixer between A
//! and B), [`AdapterKind::LorettaRep`] (A and B as tensor-trains) and
//! [`AdapterKind::LorettaAdp`] (a tensor-train bottleneck after each MLP).
#![warn(missing_docs)]

pub mod adapter;
pub mod attention;
pub mod blocks;
pub mod calibration;
mod checkpoint;
pub mod data;
pub mod distill;
mod error;
pub mod export;
pub mod fused;
pub mod importance;
pub mod init;
pub mod model;
pub mod optim;
pub mod pipeline;
pub mod prune;
pub mod quantize;
mod stream_cache;
pub mod train;
pub mod weights;
pub mod wid;

pub use adapter::{AdapterConfig, AdapterKind, MixerInit, Target};
pub use error::{Error, Result};
pub use model::{AdaptedModel, Batch, StructureMasks};
pub use weights::{Architecture, BaseWeights, LlamaConfig};
