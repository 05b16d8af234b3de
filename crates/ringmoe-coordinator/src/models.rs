//! The models a coordinator serves, known from their metadata alone: `config.json` (the shape,
//! the K/V cost of a token), `tokenizer.json` (text jobs), `generation_config.json` (EOS ids), `tokenizer_config.json` (the chat template).
//! The coordinator never loads a weight.

use std::collections::HashMap;

use ringmoe_hf::{ChatTemplate, GenerationConfig, ModelConfig, ModelEntry, Tokenizer};

use crate::error::CoordinatorError;
use crate::machine::ModelInfo;
use crate::placement::ModelShape;

/// A model the coordinator serves: its configuration, tokenizer, chat template and stop ids.
pub struct ServedModel {
    pub path: std::path::PathBuf,
    pub config: ModelConfig,
    pub tokenizer: Option<Tokenizer>,
    /// `tokenizer_config.json`'s `chat_template` (chat requests need one).
    pub chat: Option<ChatTemplate>,
    pub eos: Vec<u32>,
}

impl ServedModel {
    pub fn open(m: &ModelEntry) -> Result<Self, CoordinatorError> {
        let bad = |source| CoordinatorError::Model {
            name: m.name.clone(),
            source,
        };
        let config = ModelConfig::from_dir(&m.path).map_err(bad)?;
        let tok_path = m.path.join("tokenizer.json");
        let tokenizer = if tok_path.exists() {
            Some(Tokenizer::from_file(&tok_path).map_err(bad)?)
        } else {
            None
        };
        let mut eos = config.eos_token_ids.clone();
        if let Ok(Some(g)) = GenerationConfig::from_dir(&m.path) {
            eos.extend(g.eos_token_ids);
        }
        let chat = ChatTemplate::from_dir(&m.path).map_err(bad)?;
        Ok(Self {
            path: m.path.clone(),
            config,
            tokenizer,
            chat,
            eos,
        })
    }

    /// Bytes of K/V one token costs (f32 K and V in every layer).
    pub fn kv_bytes_per_token(&self) -> u64 {
        let c = &self.config;
        (c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4) as u64
    }

    pub fn info(&self) -> ModelInfo {
        ModelInfo {
            shape: ModelShape {
                layers: self.config.num_layers,
                experts: self.config.moe.num_experts,
                path: self.path.display().to_string(),
            },
            kv_bytes_per_token: self.kv_bytes_per_token(),
        }
    }
}

pub(crate) fn open_all(
    entries: &[ModelEntry],
) -> Result<HashMap<String, ServedModel>, CoordinatorError> {
    entries
        .iter()
        .map(|m| Ok((m.name.clone(), ServedModel::open(m)?)))
        .collect()
}
