//! # geek-agent
//!
//! The gradual knowledge-excavation loop (GEEK, Findings of EMNLP 2023) and the library API
//! other programs call. Not implemented yet: this crate only fixes its place in the workspace
//! (it depends on `geek-backend` and, later, `geek-retriever`).
#![warn(missing_docs)]
