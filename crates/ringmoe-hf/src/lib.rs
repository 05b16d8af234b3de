//! `ringmoe-hf`: what a Hugging Face checkpoint directory says about the model without loading a
//! weight — `config.json` and `generation_config.json` ([`ModelConfig`], [`GenerationConfig`])
//! `tokenizer.json` ([`Tokenizer`]) and the chat template ([`ChatTemplate`]).
//!
//! The control plane (the coordinator tokenizes text jobs and sizes K/V from the config) uses this
//! crate alone, so it never links the compute engine; `ringmoe-model` re-exports it.

pub mod chat;
pub mod config;
pub mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use config::{Architecture, GenerationConfig, ModelConfig};
pub use tokenizer::{TextStream, Tokenizer};

use std::path::PathBuf;

/// A model as a cluster serves it: the name jobs use and its checkpoint directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelEntry {
    pub name: String,
    pub path: PathBuf,
}

/// Errors reading a checkpoint's metadata, each naming the file or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },

    #[error("config.json: {field}: {msg}")]
    Config { field: String, msg: String },

    #[error(
        "unsupported architecture {name:?} (supported: MixtralForCausalLM, Qwen3MoeForCausalLM, Qwen2MoeForCausalLM)"
    )]
    UnknownArchitecture { name: String },

    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },

    #[error("chat template ({path}): {msg}")]
    ChatTemplate { path: PathBuf, msg: String },
}

pub type Result<T> = std::result::Result<T, Error>;
