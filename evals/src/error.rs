//! The one error type of the evals crate.

use std::path::PathBuf;

/// Everything that can go wrong in an evaluation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("I/O error on {path}: {source}")]
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
}

/// `Result` with the evals' [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
