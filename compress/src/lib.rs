//! # geek-compress
//!
//! Produces the agent's model. This crate runs the llama transformer in `candle` on CPU with a
//! frozen base and trainable adapters, trains them on (prompt, completion) JSONL, and writes the
//! result as GGUF files the backend loads.
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
//! Adapters: [`AdapterKind::Lora`], [`AdapterKind::Moslora`] (a learnable r×r mixer between A
//! and B), [`AdapterKind::LorettaRep`] (A and B as tensor-trains) and
//! [`AdapterKind::LorettaAdp`] (a tensor-train bottleneck after each MLP).
#![warn(missing_docs)]

pub mod adapter;
pub mod attention;
pub mod blocks;
pub mod data;
pub mod distill;
mod error;
pub mod export;
pub mod fused;
pub mod init;
pub mod model;
pub mod quantize;
pub mod train;
pub mod weights;

pub use adapter::{AdapterConfig, AdapterKind, MixerInit, Target};
pub use error::{Error, Result};
pub use model::{AdaptedModel, Batch};
pub use weights::{BaseWeights, LlamaConfig};
