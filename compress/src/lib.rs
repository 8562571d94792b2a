//! # geek-compress
//!
//! Produces the agent's model: adapters (LoRA, MoSLoRA, LoRETTA), quantization and pruning on
//! `candle` tensors, exported as GGUF for the backend. Not implemented yet.
#![warn(missing_docs)]
