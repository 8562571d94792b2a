//! # geek-evals
//!
//! Measuring geek on StrategyQA (Geva et al., TACL 2021):
//! - [`strategyqa`]: the dataset files, read strictly (a malformed question is reported with
//!   its position before any work starts);
//! - [`recall`]: the official Recall@10 of gold evidence paragraphs;
//! - [`retrieval`]: `geek eval retrieval`, Recall@10 of the BM25 retriever with the question
//!   alone or with one query per gold decomposition step.
#![warn(missing_docs)]

mod error;
pub mod methods;
pub mod recall;
pub mod retrieval;
pub mod run;
pub mod strategyqa;

pub use error::{Error, Result};
