//! The CUDA backend's types in a build without the `cuda` feature: nothing can be constructed,
//! every entry point says why.

use ringmoe_core::Tensor;

use crate::{CudaError, Result};

pub fn available() -> Result<()> {
    Err(CudaError::NotCompiled)
}

pub fn compile_kernels(_major: i32, _minor: i32) -> Result<Vec<String>> {
    Err(CudaError::NotCompiled)
}

/// Cannot be constructed without the `cuda` feature.
#[derive(Debug)]
pub struct CudaBackend(());

#[derive(Debug)]
pub struct DeviceTensor(());

#[derive(Debug)]
pub struct DeviceWeight(());

#[derive(Debug)]
pub struct CudaKvCache(());

/// Cannot be constructed without the `cuda` feature.
#[derive(Debug)]
pub struct CudaModel {
    pub config: ringmoe_model::ModelConfig,
    _none: std::convert::Infallible,
}

/// What a rank holds after a GPU prefill (never, without the `cuda` feature).
#[derive(Debug)]
pub struct CudaRankPrefill {
    pub positions: Vec<usize>,
    pub hidden: DeviceTensor,
    pub cache: CudaKvCache,
    pub routing: Vec<(usize, ringmoe_model::moe::Routing)>,
    pub moe: ringmoe_parallel::MoeStats,
}

/// Cannot be constructed without the `cuda` feature.
#[derive(Debug)]
pub struct CudaShardedSequence<'a>(std::marker::PhantomData<&'a ()>);

impl<'a> CudaShardedSequence<'a> {
    pub fn prefill_shard(
        _model: &'a CudaModel,
        _comm: &'a ringmoe_comm::nccl::NcclCommunicator,
        _plan: &ringmoe_parallel::ShardPlan,
        _mine: &[u32],
        _ep: Option<&'a ringmoe_parallel::ExpertParallel>,
        _on_layer: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<(Self, Vec<f32>)> {
        Err(CudaError::NotCompiled)
    }

    pub fn decode(&mut self, _token: u32) -> Result<Vec<f32>> {
        Err(CudaError::NotCompiled)
    }
}

impl CudaModel {
    pub fn precision(&self) -> crate::Precision {
        crate::Precision::default()
    }

    pub fn weight_bytes(&self) -> usize {
        0
    }

    pub fn prefill_shard(
        &self,
        _comm: &ringmoe_comm::nccl::NcclCommunicator,
        _plan: &ringmoe_parallel::ShardPlan,
        _tokens: &[u32],
        _ep: Option<&ringmoe_parallel::ExpertParallel>,
        _on_layer: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<CudaRankPrefill> {
        Err(CudaError::NotCompiled)
    }

    pub fn logits_of_rows(
        &self,
        _hidden: &DeviceTensor,
        _start: usize,
        _end: usize,
    ) -> Result<Tensor> {
        Err(CudaError::NotCompiled)
    }

    pub fn load(
        _b: std::sync::Arc<CudaBackend>,
        _dir: &std::path::Path,
        _experts: &ringmoe_model::ExpertSelection,
        _precision: crate::Precision,
    ) -> Result<Self> {
        Err(CudaError::NotCompiled)
    }

    pub fn prefill(&self, _tokens: &[u32]) -> Result<Tensor> {
        Err(CudaError::NotCompiled)
    }

    pub fn score(&self, _tokens: &[u32]) -> Result<Vec<f32>> {
        Err(CudaError::NotCompiled)
    }
}

impl CudaBackend {
    pub fn new(_ordinal: usize) -> Result<Self> {
        Err(CudaError::NotCompiled)
    }

    pub fn describe(&self) -> String {
        String::new()
    }

    pub fn join_nccl(
        &self,
        _comm: &ringmoe_comm::Communicator,
        _timeout: std::time::Duration,
    ) -> Result<ringmoe_comm::nccl::NcclCommunicator> {
        Err(CudaError::NotCompiled)
    }

    pub fn upload(&self, _t: &Tensor) -> Result<DeviceTensor> {
        Err(CudaError::NotCompiled)
    }

    pub fn download(&self, _t: &DeviceTensor) -> Result<Tensor> {
        Err(CudaError::NotCompiled)
    }
}

/// `gpu-check` without CUDA support: says so.
pub mod check {
    use std::path::Path;
    use std::sync::Arc;

    use ringmoe_model::{ModelConfig, TensorSource};

    pub use crate::report::{AttentionTiming, Check, ModelTiming};
    use crate::{CudaBackend, CudaError, Precision, Result};

    pub fn ring_nccl(
        _plan: &ringmoe_parallel::ShardPlan,
        _heads: usize,
        _kv_heads: usize,
        _head_dim: usize,
    ) -> Result<(Vec<Check>, Vec<f64>)> {
        Err(CudaError::NotCompiled)
    }

    pub fn fixtures(_b: &Arc<CudaBackend>, _dir: &Path) -> Result<Vec<Check>> {
        Err(CudaError::NotCompiled)
    }

    pub fn distributed(_dir: &Path, _world: usize) -> Result<Vec<Check>> {
        Err(CudaError::NotCompiled)
    }

    pub fn model_timing(
        _b: &Arc<CudaBackend>,
        _cfg: &ModelConfig,
        _src: &dyn TensorSource,
        _precision: Precision,
        _tokens: &[usize],
        _iters: usize,
    ) -> Result<Vec<ModelTiming>> {
        Err(CudaError::NotCompiled)
    }

    pub fn kernels(_b: &CudaBackend) -> Result<Vec<Check>> {
        Err(CudaError::NotCompiled)
    }

    pub fn attention_timing(
        _b: &CudaBackend,
        _tokens: usize,
        _heads: usize,
        _kv_heads: usize,
        _head_dim: usize,
        _iters: usize,
    ) -> Result<AttentionTiming> {
        Err(CudaError::NotCompiled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_the_feature_every_entry_point_says_so() {
        let e = CudaBackend::new(0).err().map(|e| e.to_string());
        assert!(e.is_some_and(|m| m.contains("not compiled with CUDA support")));
        assert!(matches!(available(), Err(CudaError::NotCompiled)));
    }
}
