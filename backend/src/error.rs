//! The one error type of the backend crate.

use std::path::PathBuf;

/// Everything that can go wrong in the backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model file does not exist.
    #[error("model file not found: {0}")]
    ModelNotFound(PathBuf),
    /// The file exists but is not a GGUF file (wrong magic).
    #[error("{path} is not a GGUF file (magic bytes {magic:02x?}, expected \"GGUF\")")]
    NotGguf {
        /// The offending file.
        path: PathBuf,
        /// The first bytes that were read.
        magic: Vec<u8>,
    },
    /// The file starts like a GGUF file but its header, metadata or tensor table is broken
    /// (truncated download, garbage bytes).
    #[error("corrupt GGUF file {path}: {reason}")]
    CorruptGguf {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The GGUF declares an architecture that llama.cpp does not implement.
    #[error("unsupported model architecture {architecture:?} in {path}")]
    UnsupportedArchitecture {
        /// The offending file.
        path: PathBuf,
        /// The `general.architecture` value.
        architecture: String,
    },
    /// llama.cpp refused to load a file that looked valid.
    #[error("llama.cpp could not load {path}: {reason}")]
    ModelLoad {
        /// The offending file.
        path: PathBuf,
        /// What llama.cpp (or its Rust binding) reported.
        reason: String,
    },
    /// A LoRA adapter could not be loaded or applied.
    #[error("LoRA adapter {path}: {reason}")]
    Lora {
        /// The adapter file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The request does not fit in the context window. Checked before anything is decoded.
    #[error("context overflow: {needed} tokens needed but the context holds {limit}")]
    ContextOverflow {
        /// Tokens the sequence would hold after the request.
        needed: usize,
        /// The context size (`n_ctx`).
        limit: usize,
    },
    /// All KV cache cells are in use by live sequences.
    #[error("the KV cache is full ({n_ctx} cells shared by all sequences); drop some sequences")]
    KvCacheFull {
        /// The context size (`n_ctx`).
        n_ctx: usize,
    },
    /// Every sequence id of the context is in use.
    #[error("no free sequence slot (the context was created with {max} sequences)")]
    NoFreeSequence {
        /// The configured maximum number of sequences.
        max: usize,
    },
    /// A sequence was given a second request while the first one was still running.
    #[error("sequence {0} is busy with another request")]
    SequenceBusy(i32),
    /// A GBNF grammar failed to parse.
    #[error("invalid GBNF grammar: {0}")]
    Grammar(String),
    /// A sampling or generation parameter is out of range.
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    /// The model has no chat template, or applying it failed.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// `llama_decode` failed.
    #[error("llama_decode failed: {0}")]
    Decode(String),
    /// The engine thread is gone (it panicked or was shut down).
    #[error("the inference engine has stopped")]
    EngineStopped,
    /// Fetching or verifying a catalogue model failed.
    #[error("model fetch: {0}")]
    Fetch(String),
    /// A catalogue model name that does not exist.
    #[error("unknown model {name:?}; known models: {known}")]
    UnknownModel {
        /// The requested name.
        name: String,
        /// Comma-separated catalogue names.
        known: String,
    },
    /// A remote model server (llama-server, `geek serve`) failed or answered something
    /// unexpected.
    #[error("model server {endpoint}: {reason}")]
    Remote {
        /// The server's base URL.
        endpoint: String,
        /// What went wrong.
        reason: String,
    },
    /// Plain I/O failure.
    #[error("I/O error on {path}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// `Result` with the backend's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
