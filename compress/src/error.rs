//! The one error type of the crate.

use std::path::PathBuf;

/// Everything that can go wrong while loading, training or exporting a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (shapes, dtypes, a malformed GGUF read by candle).
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error("I/O error on {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A GGUF file lacks what a model of its architecture needs, or has a value of the wrong type.
    #[error("{path}: {message}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What is missing or wrong.
        message: String,
    },
    /// The model's architecture has no candle implementation here.
    #[error("architecture `{0}` is not supported by compress (supported: llama, qwen2, deci)")]
    UnsupportedArchitecture(String),
    /// A line of a JSONL training file is not a `{"prompt", "completion"}` object.
    #[error("{path}:{line}: {message}")]
    Data {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// An option has a value that cannot work (rank 0, an unknown target module, …).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The adapter kind cannot be written in the requested format.
    #[error("{0}")]
    NotExportable(String),
    /// The tokenizer (the llama.cpp backend) failed.
    #[error(transparent)]
    Backend(#[from] geek_backend::Error),
    /// The encoder (retriever crate) failed to load or tokenize.
    #[error(transparent)]
    Retriever(#[from] geek_retriever::Error),
    /// A checkpoint does not belong to this run (other base model, adapter or data).
    #[error("checkpoint {path} does not match this run: {message}")]
    CheckpointMismatch {
        /// The checkpoint directory.
        path: PathBuf,
        /// Which setting differs.
        message: String,
    },
    /// JSON (checkpoint state, adapter config) could not be parsed or written.
    #[error("bad JSON in {path}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: I/O and wrapped errors repeated their source's text.
    #[test]
    fn a_wrapped_error_is_printed_once() {
        let errors = [
            Error::io("/x")(std::io::Error::other("disk on fire")),
            Error::from(geek_backend::Error::Fetch("disk on fire".into())),
        ];
        for e in errors {
            let mut text = e.to_string();
            let mut cur = std::error::Error::source(&e);
            while let Some(s) = cur {
                text.push_str(&format!(": {s}"));
                cur = s.source();
            }
            assert_eq!(text.matches("disk on fire").count(), 1, "{text}");
        }
    }
}
