//! One error type for the model layer. Every variant that comes from a file names the file, so
//! that "which of my three models is broken" never needs a debugger.

use std::path::PathBuf;

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The I/O error is part of the message, not a `source`: printing the error chain would
    /// otherwise repeat it.
    #[error("cannot open model file {path}: {cause}")]
    Open {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path} is not a GGUF file: {reason}")]
    NotGguf { path: PathBuf, reason: String },
    #[error("{path} is truncated: {reason}")]
    Truncated { path: PathBuf, reason: String },
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "{path}: unknown architecture {arch:?} (general.architecture); verdict supports {}",
        super::gguf::Arch::ALL.map(super::gguf::Arch::name).join(", ")
    )]
    UnknownArch { path: PathBuf, arch: String },
    #[error("{path}: unsupported tensor type {reason}")]
    UnsupportedQuant { path: PathBuf, reason: String },
    #[error("{path}: metadata key {key}: {reason}")]
    Metadata {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("{path}: tensor {tensor}: {reason}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    #[error(
        "context overflow: {len} tokens in the session + {new} new exceed the model's context length {max}"
    )]
    ContextOverflow { len: usize, new: usize, max: usize },
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A chunked prefill stopped between chunks because its caller asked
    /// ([`super::batch::interruptible`]); none of its positions stayed cached.
    #[error("the prefill was interrupted: its request was cancelled")]
    Interrupted,
    /// A GPU driver call failed (the CUDA decode path).
    #[error("GPU: {0}")]
    Device(String),
    #[error("{context}: {}", candle_msg(source))]
    Candle {
        context: String,
        #[source]
        source: candle_core::Error,
    },
}

impl From<candle_core::Error> for ModelError {
    fn from(source: candle_core::Error) -> Self {
        ModelError::Candle {
            context: "tensor operation failed".into(),
            source,
        }
    }
}

/// Adds a context line to candle errors (`.ctx("layer 3 attention")`).
pub(crate) trait CandleContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> CandleContext<T> for std::result::Result<T, candle_core::Error> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| ModelError::Candle {
            context: context(),
            source,
        })
    }
}

/// A candle error's message without the backtrace candle appends when RUST_BACKTRACE is set.
pub(crate) fn candle_msg(e: &candle_core::Error) -> String {
    let s = e.to_string();
    match s.find("\n   0: ") {
        Some(i) => s[..i].trim_end().to_string(),
        None => s,
    }
}
