//! `ringmoe-cuda`: the CUDA backend (feature `cuda`).
//!
//! [`CudaBackend`] owns a device context, a stream, a cuBLAS handle and the kernels of
//! `kernels.cu`, compiled at start by NVRTC for the device's compute capability (the choice over
//! `nvcc`-built PTX: nothing but the driver, NVRTC and cuBLAS libraries is needed at run time, and
//! CI needs no CUDA at all). Everything goes through cudarc with dynamic loading: the binary links
//! no CUDA library, and [`available`] checks the driver, NVRTC and cuBLAS before anything touches
//! them (cudarc's `CudaContext::new` panics without a driver).
//!
//! What it provides, each checked against ringmoe-core's CPU kernel by `ringmoe gpu-check`:
//!
//! * [`DeviceTensor`] (f32 on the device) and [`DeviceWeight`] (bf16 or f32 by [`Precision`],
//!   uploaded once).
//! * GEMMs `x · wᵀ` through cuBLAS: f32, and bf16 inputs with f32 accumulation and f32 output;
//!   [`CudaBackend::grouped_linear`] runs every local expert's GEMM in one
//!   `cublasGemmGroupedBatchedEx` launch (cuBLAS 12.5 or later).
//! * RMSNorm, rotate-half RoPE by absolute position, fused SwiGLU, router softmax + top-k, and a
//!   blockwise attention with an online softmax returning `(out, lse)` under the causal mask by
//!   absolute position — the two pieces ring attention is built from.
//!
//! Without the feature the same types exist and every constructor returns
//! [`CudaError::NotCompiled`], so no other crate needs `cfg`.
//!
//! This crate holds no model, sharding or dispatch logic of its own: [`CudaBackend`] implements
//! `ringmoe_core::Backend` and the NCCL communicator `ringmoe_parallel::Collective`
//! (`backend.rs`), and the one model (`ringmoe_model::Model<B>`), ring attention, sharded decode
//! and expert parallelism (`ringmoe-parallel`) run on them as they run on the CPU. [`CudaModel`]
//! and [`CudaShardedSequence`] are those generic types on this backend.
//!
//! Status: compile-checked in CI; not yet run on a GPU (see docs/performance.md for the GPU
//! checks still owed).

#[cfg(feature = "cuda")]
pub mod check;
#[cfg(not(feature = "cuda"))]
pub use stub::check;
#[cfg(feature = "cuda")]
mod backend;
#[cfg(feature = "cuda")]
mod device;
pub mod report;
#[cfg(not(feature = "cuda"))]
mod stub;

#[cfg(feature = "cuda")]
pub use backend::{CudaVector, CudaWeight, device_precision, host_precision};
#[cfg(feature = "cuda")]
pub use device::{
    CudaBackend, DeviceKv, DeviceRope, DeviceTensor, DeviceWeight, available, compile_kernels,
};
#[cfg(not(feature = "cuda"))]
pub use stub::{CudaBackend, DeviceTensor, available, compile_kernels, host_precision};

/// The model on one GPU: `ringmoe_model::Model` on the CUDA backend.
pub type CudaModel = ringmoe_model::Model<CudaBackend>;
/// A K/V cache in device memory.
pub type CudaKvCache = ringmoe_model::KvCache<CudaBackend>;
/// What a GPU rank holds after a sharded prefill.
pub type CudaRankPrefill = ringmoe_parallel::RankPrefill<CudaBackend>;
/// A sequence whose K/V cache is sharded over the GPUs of an NCCL group.
pub type CudaShardedSequence<'a> =
    ringmoe_parallel::ShardedSequence<'a, CudaBackend, ringmoe_comm::nccl::NcclCommunicator>;

/// Loads `DIR/config.json` and the weights `experts` selects from `DIR`'s safetensors onto `b`'s
/// GPU, the large matrices in `precision` (the host reads one layer at a time).
pub fn load_model(
    b: std::sync::Arc<CudaBackend>,
    dir: &std::path::Path,
    experts: &ringmoe_model::ExpertSelection,
    precision: Precision,
) -> Result<CudaModel> {
    Ok(CudaModel::load_on(
        b,
        dir,
        &load_options(experts, precision),
    )?)
}

/// What the host loader reads for a GPU model: the experts selected, matrices in `precision`.
fn load_options(
    experts: &ringmoe_model::ExpertSelection,
    precision: Precision,
) -> ringmoe_model::LoadOptions {
    ringmoe_model::LoadOptions {
        experts: experts.clone(),
        weights: host_precision(precision),
    }
}

/// [`load_model`] from any tensor source (random weights for benches).
pub fn model_from_source(
    b: std::sync::Arc<CudaBackend>,
    cfg: ringmoe_model::ModelConfig,
    src: &dyn ringmoe_model::TensorSource,
    experts: &ringmoe_model::ExpertSelection,
    precision: Precision,
) -> Result<CudaModel> {
    Ok(CudaModel::from_source_on(
        b,
        cfg,
        src,
        &load_options(experts, precision),
    )?)
}

/// The precision of the large weight matrices on the device (projections, experts, embedding,
/// lm_head). Norms, biases and the router stay f32 either way, and every GEMM accumulates in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Serving: half the memory and tensor-core GEMMs; logits within ~1e-2 of the f32 reference.
    #[default]
    Bf16,
    /// The parity path: f32 weights and f32 cuBLAS GEMMs (no TF32), logits within 1e-3.
    F32,
}

impl Precision {
    /// Bytes per weight element.
    pub fn bytes(self) -> usize {
        match self {
            Self::Bf16 => 2,
            Self::F32 => 4,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = CudaError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bf16" => Ok(Self::Bf16),
            "f32" => Ok(Self::F32),
            other => Err(CudaError::Invalid {
                op: "precision",
                msg: format!("{other:?} is not bf16 or f32"),
            }),
        }
    }
}

/// The CUDA C source of every kernel, compiled by NVRTC at start.
pub const KERNELS: &str = include_str!("kernels.cu");

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("ringmoe was not compiled with CUDA support (build with --features cuda)")]
    NotCompiled,

    #[error("CUDA is not usable here: {0}")]
    Unavailable(String),

    #[error("CUDA driver: {0}")]
    Driver(String),

    #[error("compiling the CUDA kernels with NVRTC: {0}")]
    Compile(String),

    #[error("cuBLAS: {0}")]
    Blas(String),

    #[error("{op}: {msg}")]
    Invalid { op: &'static str, msg: String },

    #[error(transparent)]
    Core(#[from] ringmoe_core::Error),

    #[error(transparent)]
    Model(#[from] ringmoe_model::Error),

    #[error(transparent)]
    Comm(#[from] ringmoe_comm::CommError),

    #[error(transparent)]
    Parallel(#[from] ringmoe_parallel::ParallelError),
}

pub type Result<T> = std::result::Result<T, CudaError>;

/// A plan that does not fit is the distributed forward's error, as on the host path.
impl From<ringmoe_parallel::PlanError> for CudaError {
    fn from(e: ringmoe_parallel::PlanError) -> Self {
        Self::Parallel(e.into())
    }
}

/// A device failure inside the generic distributed code (`ringmoe-parallel`, written over
/// [`ringmoe_core::Backend`]) is that code's `Device` error.
impl From<CudaError> for ringmoe_parallel::ParallelError {
    fn from(e: CudaError) -> Self {
        match e {
            CudaError::Parallel(p) => p,
            other => Self::Device(Box::new(other)),
        }
    }
}

/// A checkpoint's metadata error is the model's, as on the host path.
impl From<ringmoe_model::HfError> for CudaError {
    fn from(e: ringmoe_model::HfError) -> Self {
        Self::Model(e.into())
    }
}
