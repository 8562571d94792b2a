//! The one error type of the retriever crate.

use std::path::PathBuf;

/// Everything that can go wrong while building, opening or querying a retriever.
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
    /// A corpus file is not what it should be.
    #[error("bad corpus file {path}: {reason}")]
    Corpus {
        /// The file.
        path: PathBuf,
        /// What is wrong (with the line number for JSONL).
        reason: String,
    },
    /// There is no index at the given place.
    #[error("no index at {0}; build one with `geek index build`")]
    IndexMissing(PathBuf),
    /// The index was built by another version of geek with another schema.
    #[error("index at {path} has schema version {found}, this geek needs {expected}; rebuild it with `geek index build`")]
    SchemaMismatch {
        /// The index directory.
        path: PathBuf,
        /// Version found on disk.
        found: u32,
        /// Version this build writes and reads.
        expected: u32,
    },
    /// tantivy failed.
    #[error("search index: {0}")]
    Index(#[from] tantivy::TantivyError),
    /// A web provider failed after its retries (the agent treats this as "no results").
    #[error("web retrieval from {provider}: {reason}")]
    Web {
        /// Provider name.
        provider: String,
        /// What went wrong.
        reason: String,
    },
}

/// `Result` with the retriever's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
