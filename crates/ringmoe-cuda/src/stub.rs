//! The CUDA backend's types in a build without the `cuda` feature: nothing can be constructed,
//! every entry point says why.

use ringmoe_comm::Tag;
use ringmoe_comm::nccl::NcclCommunicator;
use ringmoe_core::attention::AttentionParams;
use ringmoe_core::rope::RopeTable;
use ringmoe_core::sparse::Sparsity;
use ringmoe_core::{
    Backend, ExpertGroup, KvRef, KvStore, Partial, Stored, Tensor, WeightPrecision, Weights,
};
use ringmoe_parallel::Collective;

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

/// Device values, which cannot exist without the `cuda` feature.
#[derive(Debug, Clone)]
pub enum DeviceTensor {}

impl Stored for DeviceTensor {
    fn bytes(&self) -> usize {
        match *self {}
    }
}

impl KvStore for DeviceTensor {
    fn positions(&self) -> &[usize] {
        match *self {}
    }

    fn bytes(&self) -> usize {
        match *self {}
    }
}

/// The `--weights` choice that loads a model in device precision `p`.
pub fn host_precision(p: crate::Precision) -> WeightPrecision {
    match p {
        crate::Precision::F32 => WeightPrecision::F32,
        crate::Precision::Bf16 => WeightPrecision::BF16,
    }
}

fn nc<T>() -> ringmoe_core::Result<T> {
    Err(ringmoe_core::Error::Device(Box::new(
        CudaError::NotCompiled,
    )))
}

/// Every operation fails: nothing of this backend can be constructed without the feature.
impl Backend for CudaBackend {
    type Act = DeviceTensor;
    type Weight = DeviceTensor;
    type Vector = DeviceTensor;
    type Kv = DeviceTensor;
    type Rope = DeviceTensor;

    fn weight(
        &self,
        _: Weights,
        _: WeightPrecision,
        _: bool,
    ) -> ringmoe_core::Result<DeviceTensor> {
        nc()
    }
    fn vector(&self, _: Vec<f32>) -> ringmoe_core::Result<DeviceTensor> {
        nc()
    }
    fn linear(
        &self,
        x: &DeviceTensor,
        _: &DeviceTensor,
        _: Option<&DeviceTensor>,
    ) -> ringmoe_core::Result<DeviceTensor> {
        match *x {}
    }
    fn weight_rows(&self, w: &DeviceTensor, _: &[usize]) -> ringmoe_core::Result<DeviceTensor> {
        match *w {}
    }
    fn rms_norm(
        &self,
        x: &DeviceTensor,
        _: &DeviceTensor,
        _: f32,
    ) -> ringmoe_core::Result<DeviceTensor> {
        match *x {}
    }
    fn rms_norm_chunks(
        &self,
        x: &mut DeviceTensor,
        _: &DeviceTensor,
        _: f32,
    ) -> ringmoe_core::Result<()> {
        match *x {}
    }
    fn split_qkv(
        &self,
        x: &DeviceTensor,
        _: usize,
        _: usize,
    ) -> ringmoe_core::Result<(DeviceTensor, DeviceTensor, DeviceTensor)> {
        match *x {}
    }
    fn rope_table(&self, _: RopeTable) -> ringmoe_core::Result<DeviceTensor> {
        nc()
    }
    fn rope(
        &self,
        x: &mut DeviceTensor,
        _: usize,
        _: usize,
        _: &DeviceTensor,
    ) -> ringmoe_core::Result<()> {
        match *x {}
    }
    fn swiglu(&self, x: &DeviceTensor) -> ringmoe_core::Result<DeviceTensor> {
        match *x {}
    }
    fn add_inplace(&self, x: &mut DeviceTensor, _: &DeviceTensor) -> ringmoe_core::Result<()> {
        match *x {}
    }
    fn add_gated(
        &self,
        x: &mut DeviceTensor,
        _: &DeviceTensor,
        _: &DeviceTensor,
    ) -> ringmoe_core::Result<()> {
        match *x {}
    }
    fn set_rows(
        &self,
        x: &mut DeviceTensor,
        _: usize,
        _: &DeviceTensor,
    ) -> ringmoe_core::Result<()> {
        match *x {}
    }
    fn grouped_mlp(
        &self,
        x: &DeviceTensor,
        _: &[ExpertGroup<'_, DeviceTensor>],
    ) -> ringmoe_core::Result<DeviceTensor> {
        match *x {}
    }
    fn new_kv(&self, _: usize) -> ringmoe_core::Result<DeviceTensor> {
        nc()
    }
    fn kv_append(
        &self,
        kv: &mut DeviceTensor,
        _: DeviceTensor,
        _: DeviceTensor,
        _: &[usize],
    ) -> ringmoe_core::Result<()> {
        match *kv {}
    }
    fn kv_trim(&self, kv: &mut DeviceTensor, _: usize, _: usize) -> ringmoe_core::Result<()> {
        match *kv {}
    }
    fn attend_cached(
        &self,
        _: &AttentionParams,
        _: &Sparsity<'_>,
        q: &DeviceTensor,
        _: &[usize],
        _: &DeviceTensor,
    ) -> ringmoe_core::Result<Partial<DeviceTensor>> {
        match *q {}
    }
    fn dims(&self, a: &DeviceTensor) -> ringmoe_core::Result<(usize, usize)> {
        match *a {}
    }
    fn upload(&self, _: &Tensor) -> ringmoe_core::Result<DeviceTensor> {
        nc()
    }
    fn download(&self, a: &DeviceTensor) -> ringmoe_core::Result<Tensor> {
        match *a {}
    }
    fn reshape(&self, a: DeviceTensor, _: usize, _: usize) -> ringmoe_core::Result<DeviceTensor> {
        match a {}
    }
    fn zeros(&self, _: usize, _: usize) -> ringmoe_core::Result<DeviceTensor> {
        nc()
    }
    fn gather_rows(&self, a: &DeviceTensor, _: &[usize]) -> ringmoe_core::Result<DeviceTensor> {
        match *a {}
    }
    fn rows(&self, a: &DeviceTensor, _: usize, _: usize) -> ringmoe_core::Result<DeviceTensor> {
        match *a {}
    }
    fn concat_rows(&self, _: &[DeviceTensor]) -> ringmoe_core::Result<DeviceTensor> {
        nc()
    }
    fn combine(
        &self,
        a: &DeviceTensor,
        _: &[usize],
        _: &[f32],
        _: usize,
    ) -> ringmoe_core::Result<DeviceTensor> {
        match *a {}
    }
    fn attend(
        &self,
        _: &AttentionParams,
        _: &Sparsity<'_>,
        q: &DeviceTensor,
        _: &[usize],
        _: KvRef<'_, DeviceTensor>,
        _: &[usize],
    ) -> ringmoe_core::Result<(Partial<DeviceTensor>, u64)> {
        match *q {}
    }
    fn merge_rows(
        &self,
        acc: &mut Partial<DeviceTensor>,
        _: usize,
        _: &Partial<DeviceTensor>,
    ) -> ringmoe_core::Result<()> {
        match acc.out {}
    }
}

/// Every collective fails: no NCCL group can be formed without the feature.
impl Collective<CudaBackend> for NcclCommunicator {
    type Rows = DeviceTensor;
    type Step = DeviceTensor;

    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        0
    }
    fn exchange_words(
        &self,
        _: &CudaBackend,
        _: Tag,
        _: &[u32],
        _: usize,
    ) -> ringmoe_parallel::Result<Vec<u32>> {
        Err(CudaError::NotCompiled.into())
    }
    fn start_rows(
        &self,
        _: &CudaBackend,
        _: Tag,
        send: DeviceTensor,
        _: &[usize],
        _: &[usize],
    ) -> ringmoe_parallel::Result<DeviceTensor> {
        match send {}
    }
    fn finish_rows(
        &self,
        _: &CudaBackend,
        rows: DeviceTensor,
    ) -> ringmoe_parallel::Result<DeviceTensor> {
        match rows {}
    }
    fn start_sendrecv(
        &self,
        _: &CudaBackend,
        _: Tag,
        _: usize,
        send: DeviceTensor,
        _: usize,
        _: usize,
    ) -> ringmoe_parallel::Result<DeviceTensor> {
        match send {}
    }
    fn finish_sendrecv(
        &self,
        _: &CudaBackend,
        step: DeviceTensor,
    ) -> ringmoe_parallel::Result<DeviceTensor> {
        match step {}
    }
    fn all_gather(
        &self,
        _: &CudaBackend,
        _: Tag,
        send: &DeviceTensor,
    ) -> ringmoe_parallel::Result<DeviceTensor> {
        match *send {}
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
    ) -> Result<NcclCommunicator> {
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
