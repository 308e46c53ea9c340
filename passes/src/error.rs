//! The one error type of the compiler. Every variant names where the problem is (file, node,
//! tensor), because users debug exports they did not write.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The reason is part of the message and deliberately not a `source`, so that printing
    /// the error chain does not repeat it.
    #[error("{}: {reason}", path.display())]
    Io {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error("{}: not a valid ONNX model: {message}", path.display())]
    Decode { path: PathBuf, message: String },
    #[error("{}: external data of tensor '{tensor}': {message}", path.display())]
    ExternalData {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    /// A tensor (initializer, attribute, external data) or a declared shape that cannot be what
    /// it says it is.
    #[error("{}: {what}: {message}", path.display())]
    Tensor {
        path: PathBuf,
        what: String,
        message: String,
    },
    /// The model is well-formed protobuf but breaks an ONNX rule the IR relies on.
    #[error("invalid model: {0}")]
    Invalid(String),
    /// A graph failed verification; each entry names the node or value at fault.
    #[error("graph verification failed: {}", summarise(.0))]
    Verify(Vec<String>),
    #[error("{0}")]
    Unsupported(String),
    /// What was asked for is out of range or does not fit this model (an option's value, a
    /// calibration made for another model); the message names the option.
    #[error("{0}")]
    Request(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            reason: source,
        }
    }
}

/// The first few problems of a list, and how many more there are, on one line.
fn summarise(problems: &[String]) -> String {
    const SHOWN: usize = 3;
    let mut line = problems[..problems.len().min(SHOWN)].join("; ");
    if problems.len() > SHOWN {
        line.push_str(&format!("; and {} more", problems.len() - SHOWN));
    }
    line
}
