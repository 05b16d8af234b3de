//! The error type of the numerical core, classified where the error happens.

/// Errors raised by tensor construction and kernels.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("shape mismatch in {op}: expected {expected:?}, got {got:?}")]
    ShapeMismatch {
        op: &'static str,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    #[error("tensor data has {got} elements but shape {shape:?} needs {expected}")]
    ElementCount {
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },

    #[error("byte buffer of {len} bytes is not a whole number of {dtype:?} elements")]
    ByteLength { dtype: crate::DType, len: usize },

    #[error("dtype {dtype:?} cannot be converted to f32 compute")]
    UnsupportedDType { dtype: crate::DType },

    #[error("invalid argument to {op}: {msg}")]
    InvalidArgument { op: &'static str, msg: String },

    /// A device backend's failure (the CUDA backend's own error, boxed: this crate cannot
    /// name it).
    #[error(transparent)]
    Device(Box<dyn std::error::Error + Send + Sync>),
}

pub type Result<T> = std::result::Result<T, Error>;
