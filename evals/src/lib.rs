//! # geek-evals
//!
//! StrategyQA batch evaluation of the agent and its baselines. Not implemented yet.
#![warn(missing_docs)]
