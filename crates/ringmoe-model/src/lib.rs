//! `ringmoe-model`: Hugging Face checkpoints (config, safetensors, tokenizer), the MoE
//! architectures, router and experts, the single-process forward, KV cache and sampling.
//!
//! The model receives its device and the experts to load as arguments ([`LoadOptions`]); it never
//! reads environment variables or globals, so the cluster can build partial models per worker.

pub mod arch;
pub use ringmoe_hf::{Error as HfError, config, tokenizer};
pub mod checkpoint;
pub mod error;
pub mod generate;
pub mod kv_cache;
pub mod layers;
pub mod model;
pub mod moe;
pub mod rope;

pub use checkpoint::{
    Checkpoint, RandomWeights, TensorSource, bench_model_config, write_random_checkpoint,
    write_random_checkpoint_as,
};
pub use config::{Architecture, GenerationConfig, ModelConfig};
pub use error::{Error, Result};
pub use generate::{GenerationStats, Sampler, SamplingParams, generate};
pub use kv_cache::KvCache;
pub use model::{
    ExpertDelta, ExpertSelection, ForwardOutput, LoadOptions, LogitsFor, Model, ModelGlobals,
    load_parts, nll_of,
};
pub use tokenizer::{TextStream, Tokenizer};
