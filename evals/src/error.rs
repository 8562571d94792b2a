//! The one error type of the evals crate.

use std::path::PathBuf;

/// Everything that can go wrong in an evaluation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("I/O error on {path}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A dataset file is malformed.
    #[error("bad dataset {path}: {reason}")]
    Dataset {
        /// The file.
        path: PathBuf,
        /// What is wrong and where.
        reason: String,
    },
    /// Retrieval failed.
    #[error(transparent)]
    Retriever(#[from] geek_retriever::Error),
    /// The agent failed.
    #[error(transparent)]
    Agent(#[from] geek_agent::Error),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] geek_backend::Error),
    /// Another process is writing this run.
    #[error("another `geek eval` is writing this run ({path} is locked); wait for it to finish, or pass another --out")]
    RunBusy {
        /// The locked samples file.
        path: PathBuf,
    },
    /// The run was set up wrongly.
    #[error("evaluation configuration: {0}")]
    Config(String),
    /// Plotting a report failed.
    #[error("plot {path}: {reason}")]
    Plot {
        /// The image file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// `Result` with the evals' [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
