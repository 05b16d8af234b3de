//! `ringmoe-core`: tensors, the CPU compute backend and the numerical kernels every layer is built from.
//!
//! This crate owns the numerics: GEMM, RMSNorm, RoPE, SwiGLU, softmax/top-k and the blockwise
//! attention that returns `(out, lse)` together with the exact `merge` of two partial results.
//! Ring attention (a later crate) is built from exactly these two functions. Nothing here knows
//! about networking, tokio or model files.

pub mod attention;
pub mod backend;
pub mod dtype;
pub mod error;
pub mod gemm;
pub mod gemv;
pub mod kv;
pub mod ops;
pub mod q8;
pub mod rope;
pub mod simd;
pub mod sparse;
pub mod tensor;
pub mod testing;
pub mod weights;

pub use attention::{
    AttentionParams, PartialAttention, attention_block, merge, merge_into, merge_into_rows,
    naive_attention,
};
pub use backend::{Backend, Cpu, ExpertGroup, KvRef, KvStore, Partial, Sim, Stored};
pub use dtype::DType;
pub use error::{Error, Result};
pub use tensor::Tensor;
pub use weights::{WeightFormat, WeightPrecision, Weights};
