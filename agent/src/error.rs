//! The one error type of the agent crate.

/// Everything that can stop an excavation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The language model failed (context overflow, engine stopped, …).
    #[error(transparent)]
    Model(#[from] geek_backend::Error),
    /// The builder was missing something or had a value out of range.
    #[error("agent configuration: {0}")]
    Config(String),
    /// The model produced something the loop cannot use even though it was constrained
    /// (only a scripted test model can do this).
    #[error("unusable model output at {what}: {output:?}")]
    BadOutput {
        /// What was being generated.
        what: String,
        /// What came back.
        output: String,
    },
    /// The demonstrations file cannot be read.
    #[error("demonstrations {path}: {reason}")]
    Demonstrations {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The question is empty.
    #[error("the question is empty")]
    EmptyQuestion,
}

/// `Result` with the agent's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: `model: context overflow …: context overflow …`.
    #[test]
    fn a_wrapped_error_is_printed_once() {
        let e = Error::from(geek_backend::Error::ContextOverflow {
            needed: 9,
            limit: 8,
        });
        let mut text = e.to_string();
        let mut cur = std::error::Error::source(&e);
        while let Some(s) = cur {
            text.push_str(&format!(": {s}"));
            cur = s.source();
        }
        assert_eq!(text.matches("context overflow").count(), 1, "{text}");
    }
}
