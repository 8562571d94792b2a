//! # geek-evals
//!
//! Measuring geek on StrategyQA (Geva et al., TACL 2021):
//! - [`strategyqa`]: the dataset files, read strictly (a malformed question is reported with
//!   its position before any work starts);
//! - [`recall`]: the official Recall@10 of gold evidence paragraphs;
//! - [`retrieval`]: `geek eval retrieval`, Recall@10 of the BM25 retriever with the question
//!   alone or with one query per gold decomposition step;
//! - [`methods`] and [`run`]: `geek eval strategyqa`, the direct / cot / rag / geek methods on
//!   one model, batched, resumable, written in lm-evaluation-harness shapes; [`samples`] is
//!   the samples file (read-only readers, one locked writer), [`metrics`] what is computed
//!   from it;
//! - [`report`]: `geek eval report`, a Markdown table and PNG plots comparing runs.
#![warn(missing_docs)]

pub mod agent_bench;
pub mod calibration;
mod error;
pub mod methods;
pub mod metrics;
pub mod recall;
pub mod report;
pub mod retrieval;
pub mod run;
pub mod samples;
pub mod strategyqa;
pub mod trajectories;

pub use error::{Error, Result};
