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
    /// A directory to build an index in holds other files.
    #[error("{0} is not empty and is not a geek index; refusing to build an index there (choose an empty or new directory)")]
    NotAnIndex(PathBuf),
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
    /// An encoder model (config, weights, tokenizer) is missing or malformed.
    #[error("encoder model {path}: {reason}")]
    Model {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The dense store beside an index cannot be used as it is.
    #[error("dense store {path}: {reason}; build it with `geek index embed`")]
    DenseStale {
        /// Its directory.
        path: PathBuf,
        /// Why (none, unfinished, another encoder, the index rebuilt).
        reason: String,
    },
    /// A tensor operation of the encoder failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// tantivy failed.
    #[error("search index")]
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole chain as `anyhow`'s `{:#}` prints it.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut parts = vec![e.to_string()];
        let mut cur = e.source();
        while let Some(s) = cur {
            parts.push(s.to_string());
            cur = s.source();
        }
        parts.join(": ")
    }

    /// Regression: wrapped errors repeated their source's text in their own message.
    #[test]
    fn a_wrapped_error_is_printed_once() {
        let inner = tantivy::TantivyError::InvalidArgument("bad field xyz".into());
        let text = chain(&Error::from(inner));
        assert_eq!(text.matches("bad field xyz").count(), 1, "{text}");
        let io = Error::io("/x", std::io::Error::other("disk on fire"));
        let text = chain(&io);
        assert_eq!(text.matches("disk on fire").count(), 1, "{text}");
    }
}
