//! Errors of checkpoint loading and the model forward, each naming the file, tensor or field at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("config.json: {field}: {msg}")]
    Config { field: String, msg: String },

    #[error("{path}: not a valid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },

    #[error("checkpoint has no tensor {name:?}")]
    MissingTensor { name: String },

    #[error("tensor {name:?} has shape {got:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    #[error("tensor {name:?} has dtype {dtype}, expected F32, BF16 or F16")]
    TensorDType { name: String, dtype: String },

    #[error("token id {id} at position {position} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange {
        id: u32,
        position: usize,
        vocab: usize,
    },

    #[error("expert {expert} of layer {layer} is not loaded in this process (loaded: {loaded:?})")]
    ExpertNotLoaded {
        layer: usize,
        expert: usize,
        loaded: Vec<usize>,
    },

    #[error("invalid input: {0}")]
    InvalidInput(String),

    #[error(transparent)]
    Core(#[from] ringmoe_core::Error),

    /// `config.json`, `generation_config.json` or `tokenizer.json` (see `ringmoe-hf`).
    #[error(transparent)]
    Metadata(#[from] ringmoe_hf::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
