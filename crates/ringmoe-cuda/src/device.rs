//! The CUDA backend proper; the only module of this crate that calls CUDA (cudarc).

use std::sync::Arc;

use cudarc::cublas::{CudaBlas, sys as blas_sys};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut,
    LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{CompileOptions, Ptx, compile_ptx_with_opts};
use half::bf16;
use ringmoe_core::rope::RopeTable;
use ringmoe_core::{AttentionParams, Tensor};

use crate::{CudaError, KERNELS, Precision, Result};

fn compile(major: i32, minor: i32) -> Result<Ptx> {
    let opts = CompileOptions {
        options: vec![format!("--gpu-architecture=compute_{major}{minor}")],
        ..Default::default()
    };
    compile_ptx_with_opts(KERNELS, opts).map_err(|e| CudaError::Compile(e.to_string()))
}

/// Compiles the kernels with NVRTC for compute capability `major.minor` without a GPU or a
/// driver (only libnvrtc is needed) and returns the kernel entry points in the PTX.
pub fn compile_kernels(major: i32, minor: i32) -> Result<Vec<String>> {
    // SAFETY: `is_culib_present` only tries to dlopen the library by its candidate names.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CudaError::Unavailable(
            "libnvrtc.so could not be loaded".into(),
        ));
    }
    let ptx = compile(major, minor)?.to_src();
    Ok(ptx
        .lines()
        .filter_map(|l| l.trim().strip_prefix(".visible .entry "))
        .map(|l| l.split('(').next().unwrap_or(l).trim().to_string())
        .collect())
}

/// Checks that the driver, NVRTC and cuBLAS libraries can be loaded.
pub fn available() -> Result<()> {
    // SAFETY: `is_culib_present` only tries to dlopen the library by its candidate names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::Unavailable(
            "no CUDA driver (libcuda.so) could be loaded".into(),
        ));
    }
    // SAFETY: as above, for libnvrtc.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CudaError::Unavailable(
            "libnvrtc.so could not be loaded (pip's nvidia-cuda-nvrtc-cu12 ships it; put its lib \
             directory on LD_LIBRARY_PATH)"
                .into(),
        ));
    }
    // SAFETY: as above, for libcublas.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(CudaError::Unavailable(
            "libcublas.so could not be loaded (pip's nvidia-cublas-cu12 ships it; put its lib \
             directory on LD_LIBRARY_PATH)"
                .into(),
        ));
    }
    Ok(())
}

fn driver(e: impl std::fmt::Display) -> CudaError {
    CudaError::Driver(e.to_string())
}

fn blas(e: impl std::fmt::Debug) -> CudaError {
    CudaError::Blas(format!("{e:?}"))
}

fn invalid(op: &'static str, msg: String) -> CudaError {
    CudaError::Invalid { op, msg }
}

/// An f32 tensor in device memory, row-major.
#[derive(Debug)]
pub struct DeviceTensor {
    data: CudaSlice<f32>,
    shape: Vec<usize>,
}

impl DeviceTensor {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device buffer (for NCCL transfers of the tensor).
    pub(crate) fn buffer(&self) -> &CudaSlice<f32> {
        &self.data
    }

    pub(crate) fn buffer_mut(&mut self) -> &mut CudaSlice<f32> {
        &mut self.data
    }

    /// The same data with another shape of the same element count.
    pub fn reshape(self, shape: Vec<usize>) -> Result<Self> {
        if shape.iter().product::<usize>() != self.len() {
            return Err(invalid(
                "reshape",
                format!("{:?} cannot become {shape:?}", self.shape),
            ));
        }
        Ok(Self {
            data: self.data,
            shape,
        })
    }

    pub(crate) fn dims2(&self, op: &'static str) -> Result<(usize, usize)> {
        match self.shape[..] {
            [a, b] => Ok((a, b)),
            _ => Err(invalid(
                op,
                format!("expected a matrix, got {:?}", self.shape),
            )),
        }
    }
}

#[derive(Debug)]
enum WeightData {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<bf16>),
}

/// A weight matrix `[rows, cols]` (HF's `[out, in]`) in device memory, uploaded once, in bf16
/// (the serving precision) or f32 (the parity path).
#[derive(Debug)]
pub struct DeviceWeight {
    data: WeightData,
    rows: usize,
    cols: usize,
}

impl DeviceWeight {
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    pub fn precision(&self) -> Precision {
        match self.data {
            WeightData::F32(_) => Precision::F32,
            WeightData::Bf16(_) => Precision::Bf16,
        }
    }

    /// Bytes of device memory it holds.
    pub fn bytes(&self) -> usize {
        self.rows * self.cols * self.precision().bytes()
    }
}

/// One layer's K/V cache in device memory, `[len, kv_heads · head_dim]` each, with the tokens'
/// absolute positions (on the device for the kernel, on the host for the caller). Grows by
/// doubling, so decoding appends in amortised O(1) copies.
#[derive(Debug)]
pub struct DeviceKv {
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    pos: CudaSlice<i32>,
    positions: Vec<usize>,
    width: usize,
    cap: usize,
}

impl DeviceKv {
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    pub fn positions(&self) -> &[usize] {
        &self.positions
    }

    /// Bytes of device memory it holds (capacity, not length).
    pub fn bytes(&self) -> usize {
        self.cap * (2 * self.width * 4 + 4)
    }
}

/// A RoPE table in device memory, for one forward's positions (shared by q, k and every layer).
#[derive(Debug)]
pub struct DeviceRope {
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    half: usize,
    positions: usize,
}

struct Kernels {
    to_bf16: CudaFunction,
    from_bf16: CudaFunction,
    rms_norm: CudaFunction,
    rope: CudaFunction,
    swiglu: CudaFunction,
    gather_rows: CudaFunction,
    gather_rows_bf16: CudaFunction,
    add_inplace: CudaFunction,
    add_bias: CudaFunction,
    copy_cols: CudaFunction,
    combine: CudaFunction,
    add_gated: CudaFunction,
    merge_attention: CudaFunction,
    merge_lse: CudaFunction,
    router_topk: CudaFunction,
    attention: CudaFunction,
}

/// One GPU: context, stream, cuBLAS handle and the compiled kernels.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    describe: String,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.describe)
            .finish_non_exhaustive()
    }
}

fn grid(n: usize, block: u32) -> Result<LaunchConfig> {
    let blocks = n.div_ceil(block as usize);
    let blocks = u32::try_from(blocks.max(1))
        .map_err(|_| invalid("launch", format!("{n} elements need too many blocks")))?;
    Ok(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// cudarc cannot allocate zero elements: an empty host slice uploads as one zero.
fn nonempty(v: &[f32]) -> std::borrow::Cow<'_, [f32]> {
    if v.is_empty() {
        std::borrow::Cow::Owned(vec![0.0])
    } else {
        std::borrow::Cow::Borrowed(v)
    }
}

fn positions_i32(v: &[usize]) -> Result<Vec<i32>> {
    v.iter().map(|&x| i32_of("attention position", x)).collect()
}

enum GatherSrc<'a> {
    F32(&'a CudaSlice<f32>),
    Bf16(&'a CudaSlice<bf16>),
}

fn i32_of(op: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| invalid(op, format!("{v} does not fit the kernel's 32-bit index")))
}

impl CudaBackend {
    /// Opens GPU `ordinal` and compiles the kernels for it.
    pub fn new(ordinal: usize) -> Result<Self> {
        available()?;
        let ctx = CudaContext::new(ordinal).map_err(driver)?;
        let (major, minor) = ctx.compute_capability().map_err(driver)?;
        let name = ctx.name().map_err(driver)?;
        // A stream of its own rather than the legacy default stream, which would serialise with
        // NCCL's; creating it also turns on cudarc's cross-stream buffer events for this context.
        let stream = ctx.new_stream().map_err(driver)?;
        let ptx = compile(major, minor)?;
        let module = ctx.load_module(ptx).map_err(driver)?;
        let f = |name: &str| module.load_function(name).map_err(driver);
        let k = Kernels {
            to_bf16: f("to_bf16")?,
            from_bf16: f("from_bf16")?,
            rms_norm: f("rms_norm")?,
            rope: f("rope")?,
            swiglu: f("swiglu")?,
            gather_rows: f("gather_rows")?,
            gather_rows_bf16: f("gather_rows_bf16")?,
            add_inplace: f("add_inplace")?,
            add_bias: f("add_bias")?,
            copy_cols: f("copy_cols")?,
            combine: f("combine")?,
            add_gated: f("add_gated")?,
            merge_attention: f("merge_attention")?,
            merge_lse: f("merge_lse")?,
            router_topk: f("router_topk")?,
            attention: f("attention")?,
        };
        let blas = CudaBlas::new(stream.clone()).map_err(blas)?;
        Ok(Self {
            ctx,
            stream,
            blas,
            k,
            describe: format!("cuda:{ordinal} {name} (sm_{major}{minor})"),
        })
    }

    /// `cuda:N NAME (sm_XY)`.
    pub fn describe(&self) -> String {
        self.describe.clone()
    }

    /// Waits for everything queued on the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver)
    }

    pub fn upload(&self, t: &Tensor) -> Result<DeviceTensor> {
        Ok(DeviceTensor {
            data: self.stream.clone_htod(t.as_slice()).map_err(driver)?,
            shape: t.shape().to_vec(),
        })
    }

    pub fn download(&self, t: &DeviceTensor) -> Result<Tensor> {
        let v = self.stream.clone_dtoh(&t.data).map_err(driver)?;
        Ok(Tensor::from_vec(v, t.shape.clone())?)
    }

    /// A zeroed tensor (also a receive buffer).
    pub(crate) fn zeros(&self, shape: Vec<usize>) -> Result<DeviceTensor> {
        let n = shape.iter().product::<usize>();
        Ok(DeviceTensor {
            data: self.stream.alloc_zeros::<f32>(n.max(1)).map_err(driver)?,
            shape,
        })
    }

    /// A row-major `[rows, cols]` weight uploaded in `precision` (bf16: rounded to nearest even on
    /// the host).
    pub fn upload_weight(
        &self,
        data: &[f32],
        rows: usize,
        cols: usize,
        precision: Precision,
    ) -> Result<DeviceWeight> {
        if data.len() != rows * cols || data.is_empty() {
            return Err(invalid(
                "upload_weight",
                format!("{} values for a [{rows}, {cols}] weight", data.len()),
            ));
        }
        let data = match precision {
            Precision::F32 => WeightData::F32(self.stream.clone_htod(data).map_err(driver)?),
            Precision::Bf16 => {
                let h: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                WeightData::Bf16(self.stream.clone_htod(&h).map_err(driver)?)
            }
        };
        Ok(DeviceWeight { data, rows, cols })
    }

    /// A vector (norm weights, biases) uploaded in f32.
    pub fn upload_vec(&self, v: &[f32]) -> Result<DeviceTensor> {
        Ok(DeviceTensor {
            data: self
                .stream
                .clone_htod(nonempty(v).as_ref())
                .map_err(driver)?,
            shape: vec![v.len()],
        })
    }

    fn to_bf16(&self, x: &DeviceTensor) -> Result<CudaSlice<bf16>> {
        let n = x.data.len();
        // SAFETY: uninitialised memory that the kernel writes in full before anyone reads it.
        let mut out = unsafe { self.stream.alloc::<bf16>(n.max(1)) }.map_err(driver)?;
        let n64 = n as u64;
        let mut b = self.stream.launch_builder(&self.k.to_bf16);
        b.arg(&x.data).arg(&mut out).arg(&n64);
        // SAFETY: `to_bf16(const float*, unsigned short*, u64)` reads and writes `n` elements of
        // buffers that hold at least `n`.
        unsafe { b.launch(grid(n, 256)?) }.map_err(driver)?;
        Ok(out)
    }

    /// `x · wᵀ` for a `[rows, k]` x (any leading shape whose last dimension is k) and a
    /// `[n, k]` weight, f32 out. A bf16 weight takes bf16 inputs (x is rounded on the device
    /// first) with f32 accumulation; an f32 weight is a plain f32 GEMM.
    pub fn linear(&self, x: &DeviceTensor, w: &DeviceWeight) -> Result<DeviceTensor> {
        let k = *x.shape.last().unwrap_or(&0);
        let m = x.len().checked_div(k).unwrap_or(0);
        if k != w.cols {
            return Err(invalid(
                "linear",
                format!("x is {:?} but w is [{}, {}]", x.shape, w.rows, w.cols),
            ));
        }
        let mut y = self.zeros(vec![m, w.rows])?;
        match &w.data {
            WeightData::F32(wd) => self.gemm_nt(
                (m, w.rows, k),
                &x.data,
                blas_sys::cudaDataType::CUDA_R_32F,
                wd,
                blas_sys::cudaDataType::CUDA_R_32F,
                &mut y.data,
            )?,
            WeightData::Bf16(wd) => {
                let xb = self.to_bf16(x)?;
                self.gemm_nt(
                    (m, w.rows, k),
                    &xb,
                    blas_sys::cudaDataType::CUDA_R_16BF,
                    wd,
                    blas_sys::cudaDataType::CUDA_R_16BF,
                    &mut y.data,
                )?
            }
        }
        Ok(y)
    }

    /// Row-major `y[m, n] = x[m, k] · w[n, k]ᵀ`, which column-major cuBLAS sees as
    /// `yᵀ = w · xᵀ`: op(A) = wᵀ-as-stored transposed, op(B) = x as stored.
    fn gemm_nt<X, W>(
        &self,
        (m, n, k): (usize, usize, usize),
        x: &CudaSlice<X>,
        x_type: blas_sys::cudaDataType,
        w: &CudaSlice<W>,
        w_type: blas_sys::cudaDataType,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let (mi, ni, ki) = (i32_of("gemm", m)?, i32_of("gemm", n)?, i32_of("gemm", k)?);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (xp, _gx) = x.device_ptr(&self.stream);
        let (wp, _gw) = w.device_ptr(&self.stream);
        let (yp, _gy) = y.device_ptr_mut(&self.stream);
        // SAFETY: the pointers are live device buffers of this context holding [m, k], [n, k]
        // and [m, n] elements of the declared types (checked by the callers); alpha/beta are f32
        // as CUBLAS_COMPUTE_32F requires; the guards keep the buffers alive and ordered on
        // this stream until the call returns.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                ni,
                mi,
                ki,
                (&alpha) as *const f32 as *const _,
                wp as *const _,
                w_type,
                ki,
                xp as *const _,
                x_type,
                ki,
                (&beta) as *const f32 as *const _,
                yp as *mut _,
                blas_sys::cudaDataType::CUDA_R_32F,
                ni,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(blas)
    }

    /// Every local expert's `x_e · w_eᵀ` in one grouped cuBLAS launch: `x` holds the rows routed
    /// to the experts back to back (`rows[e]` of them for expert `e`, the dispatch permutation's
    /// layout), `w[e]` is expert `e`'s `[n, k]` weight. Returns `[Σ rows, n]` in the same order,
    /// f32. Grouped GEMM takes one data type for inputs and output: bf16 weights run bf16 in and
    /// out with f32 accumulation (the output widened to f32 by a kernel); f32 weights run in f32.
    /// Needs cuBLAS 12.5 or later.
    pub fn grouped_linear(
        &self,
        x: &DeviceTensor,
        rows: &[usize],
        w: &[&DeviceWeight],
    ) -> Result<DeviceTensor> {
        let (total, k) = x.dims2("grouped_linear")?;
        if rows.len() != w.len() || rows.iter().sum::<usize>() != total {
            return Err(invalid(
                "grouped_linear",
                format!(
                    "{} row counts summing to {} for {} experts and {total} rows",
                    rows.len(),
                    rows.iter().sum::<usize>(),
                    w.len()
                ),
            ));
        }
        let n = w.first().map_or(0, |w| w.rows);
        let precision = w.first().map_or(Precision::F32, |w| w.precision());
        if let Some(bad) = w
            .iter()
            .find(|w| w.rows != n || w.cols != k || w.precision() != precision)
        {
            return Err(invalid(
                "grouped_linear",
                format!(
                    "expert weights must all be [{n}, {k}] {precision:?}; one is {:?} {:?}",
                    bad.shape(),
                    bad.precision()
                ),
            ));
        }
        let mut out = self.zeros(vec![total, n])?;
        if total == 0 || n == 0 {
            return Ok(out);
        }
        match precision {
            Precision::F32 => {
                let ws: Vec<&CudaSlice<f32>> = w
                    .iter()
                    .filter_map(|w| match &w.data {
                        WeightData::F32(d) => Some(d),
                        WeightData::Bf16(_) => None,
                    })
                    .collect();
                self.grouped_gemm_nt(
                    &x.data,
                    rows,
                    (n, k),
                    &ws,
                    &mut out.data,
                    blas_sys::cudaDataType::CUDA_R_32F,
                )?;
            }
            Precision::Bf16 => {
                let ws: Vec<&CudaSlice<bf16>> = w
                    .iter()
                    .filter_map(|w| match &w.data {
                        WeightData::Bf16(d) => Some(d),
                        WeightData::F32(_) => None,
                    })
                    .collect();
                let xb = self.to_bf16(x)?;
                // SAFETY: written in full by the GEMMs (every row belongs to one expert) before
                // it is read.
                let mut yb = unsafe { self.stream.alloc::<bf16>(total * n) }.map_err(driver)?;
                self.grouped_gemm_nt(
                    &xb,
                    rows,
                    (n, k),
                    &ws,
                    &mut yb,
                    blas_sys::cudaDataType::CUDA_R_16BF,
                )?;
                let count = (total * n) as u64;
                let mut b = self.stream.launch_builder(&self.k.from_bf16);
                b.arg(&yb).arg(&mut out.data).arg(&count);
                // SAFETY: both buffers hold total·n elements.
                unsafe { b.launch(grid(total * n, 256)?) }.map_err(driver)?;
            }
        }
        Ok(out)
    }

    /// The grouped launch behind [`Self::grouped_linear`]: one problem per expert with rows,
    /// inputs, weights and outputs of one data type `ty`.
    fn grouped_gemm_nt<T>(
        &self,
        x: &CudaSlice<T>,
        rows: &[usize],
        (n, k): (usize, usize),
        w: &[&CudaSlice<T>],
        y: &mut CudaSlice<T>,
        ty: blas_sys::cudaDataType,
    ) -> Result<()> {
        if w.len() != rows.len() {
            return Err(invalid("grouped gemm", "weights of mixed precision".into()));
        }
        let live: Vec<usize> = (0..rows.len()).filter(|&e| rows[e] > 0).collect();
        if live.is_empty() {
            return Ok(());
        }
        let (xp, _gx) = x.device_ptr(&self.stream);
        let (yp, _gy) = y.device_ptr_mut(&self.stream);
        let elem = std::mem::size_of::<T>() as u64;
        let mut a_ptrs = Vec::with_capacity(live.len());
        let mut b_ptrs = Vec::with_capacity(live.len());
        let mut c_ptrs = Vec::with_capacity(live.len());
        let mut guards = Vec::with_capacity(live.len());
        let mut offset = 0u64;
        for (e, &r) in rows.iter().enumerate() {
            if r > 0 {
                let (wp, g) = w[e].device_ptr(&self.stream);
                guards.push(g);
                a_ptrs.push(wp);
                b_ptrs.push(xp + offset * k as u64 * elem);
                c_ptrs.push(yp + offset * n as u64 * elem);
            }
            offset += r as u64;
        }
        // The pointer arrays live in device memory, as cuBLAS requires.
        let a_dev = self.stream.clone_htod(&a_ptrs).map_err(driver)?;
        let b_dev = self.stream.clone_htod(&b_ptrs).map_err(driver)?;
        let c_dev = self.stream.clone_htod(&c_ptrs).map_err(driver)?;
        let g = live.len();
        let ni = i32_of("grouped gemm", n)?;
        let ki = i32_of("grouped gemm", k)?;
        let ms: Vec<i32> = vec![ni; g];
        let ns: Vec<i32> = live
            .iter()
            .map(|&e| i32_of("grouped gemm", rows[e]))
            .collect::<Result<_>>()?;
        let ks = vec![ki; g];
        let ta = vec![blas_sys::cublasOperation_t::CUBLAS_OP_T; g];
        let tb = vec![blas_sys::cublasOperation_t::CUBLAS_OP_N; g];
        let (alpha, beta) = (vec![1.0f32; g], vec![0.0f32; g]);
        let sizes = vec![1i32; g];
        let (ap, _ga) = a_dev.device_ptr(&self.stream);
        let (bp, _gb) = b_dev.device_ptr(&self.stream);
        let (cp, _gc) = c_dev.device_ptr(&self.stream);
        let handle = *self.blas.handle();
        // The dynamically loaded symbol is looked up on first use, and cudarc panics when it is
        // missing (cuBLAS older than 12.5): turn that into an error.
        let call = std::panic::catch_unwind(|| {
            // SAFETY: g groups of one problem each; the host arrays have g entries; the device
            // pointer arrays hold g pointers into live buffers of type `ty` sized for [n, k]
            // weights, [rows[e], k] inputs and [rows[e], n] outputs; alpha/beta are f32 for
            // CUBLAS_COMPUTE_32F; the guards keep every buffer alive and ordered.
            unsafe {
                blas_sys::cublasGemmGroupedBatchedEx(
                    handle,
                    ta.as_ptr(),
                    tb.as_ptr(),
                    ms.as_ptr(),
                    ns.as_ptr(),
                    ks.as_ptr(),
                    alpha.as_ptr() as *const _,
                    ap as *const *const _,
                    ty,
                    ks.as_ptr(),
                    bp as *const *const _,
                    ty,
                    ks.as_ptr(),
                    beta.as_ptr() as *const _,
                    cp as *const *mut _,
                    ty,
                    ms.as_ptr(),
                    g as i32,
                    sizes.as_ptr(),
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                )
            }
        })
        .map_err(|_| {
            CudaError::Blas(
                "cublasGemmGroupedBatchedEx is missing: grouped GEMM needs cuBLAS 12.5+".into(),
            )
        })?;
        call.result().map_err(blas)?;
        drop(guards);
        Ok(())
    }

    /// `w ⊙ x / sqrt(mean(x²) + eps)` over the last dimension.
    pub fn rms_norm(&self, x: &DeviceTensor, w: &DeviceTensor, eps: f32) -> Result<DeviceTensor> {
        let dim = *x.shape.last().unwrap_or(&0);
        if w.data.len() != dim || w.shape.iter().product::<usize>() != dim {
            return Err(invalid(
                "rms_norm",
                format!("weight {:?} for rows of {dim}", w.shape),
            ));
        }
        let rows = x.data.len().checked_div(dim).unwrap_or(0);
        let mut y = self.zeros(x.shape.clone())?;
        if rows == 0 {
            return Ok(y);
        }
        let block = 256u32;
        let cfg = LaunchConfig {
            grid_dim: (
                u32::try_from(rows).map_err(|_| invalid("rms_norm", "rows".into()))?,
                1,
                1,
            ),
            block_dim: (block, 1, 1),
            shared_mem_bytes: block * 4,
        };
        let (r, d) = (i32_of("rms_norm", rows)?, i32_of("rms_norm", dim)?);
        let mut b = self.stream.launch_builder(&self.k.rms_norm);
        b.arg(&x.data)
            .arg(&w.data)
            .arg(&mut y.data)
            .arg(&r)
            .arg(&d)
            .arg(&eps);
        // SAFETY: one block of 256 threads (a power of two, as the reduction needs) per row,
        // with 256 floats of shared memory; x and y hold rows × dim elements, w holds dim.
        unsafe { b.launch(cfg) }.map_err(driver)?;
        Ok(y)
    }

    /// Uploads a RoPE table (one forward's positions).
    pub fn rope_table(&self, table: &RopeTable) -> Result<DeviceRope> {
        Ok(DeviceRope {
            cos: self
                .stream
                .clone_htod(nonempty(&table.cos).as_ref())
                .map_err(driver)?,
            sin: self
                .stream
                .clone_htod(nonempty(&table.sin).as_ref())
                .map_err(driver)?,
            half: table.half,
            positions: table.positions,
        })
    }

    /// Rotate-half RoPE in place on `x` `[tokens, heads, head_dim]` with the CPU's table.
    pub fn rope(
        &self,
        x: &mut DeviceTensor,
        heads: usize,
        head_dim: usize,
        table: &RopeTable,
    ) -> Result<()> {
        let t = self.rope_table(table)?;
        self.rope_with(x, heads, head_dim, &t)
    }

    /// Rotate-half RoPE in place on `x` `[tokens, heads, head_dim]` with an uploaded table.
    pub fn rope_with(
        &self,
        x: &mut DeviceTensor,
        heads: usize,
        head_dim: usize,
        table: &DeviceRope,
    ) -> Result<()> {
        let half = table.half;
        let tokens = table.positions;
        if 2 * half > head_dim || x.len() != tokens * heads * head_dim {
            return Err(invalid(
                "rope",
                format!(
                    "x has {} elements for {tokens} tokens × {heads} heads × {head_dim}, rotary dim {}",
                    x.len(),
                    2 * half
                ),
            ));
        }
        if tokens * heads * half == 0 {
            return Ok(());
        }
        let (t, h, d, hf) = (
            i32_of("rope", tokens)?,
            i32_of("rope", heads)?,
            i32_of("rope", head_dim)?,
            i32_of("rope", half)?,
        );
        let mut b = self.stream.launch_builder(&self.k.rope);
        b.arg(&mut x.data)
            .arg(&table.cos)
            .arg(&table.sin)
            .arg(&t)
            .arg(&h)
            .arg(&d)
            .arg(&hf);
        // SAFETY: one thread per (token, head, pair) < tokens·heads·half; x holds
        // tokens·heads·head_dim elements and cos/sin tokens·half (checked above).
        unsafe { b.launch(grid(tokens * heads * half, 256)?) }.map_err(driver)?;
        Ok(())
    }

    /// Rows `table[idx[r]]` of a `[n, cols]` f32 tensor → `[idx.len(), cols]` (the MoE
    /// dispatch permutation). Indices are checked on the host.
    pub fn gather_rows(&self, table: &DeviceTensor, idx: &[usize]) -> Result<DeviceTensor> {
        let (n, cols) = table.dims2("gather_rows")?;
        self.gather(&GatherSrc::F32(&table.data), n, cols, idx)
    }

    /// [`Self::gather_rows`] from a weight matrix in either precision, widened to f32
    /// (embedding lookups).
    pub fn gather_weight_rows(&self, w: &DeviceWeight, idx: &[usize]) -> Result<DeviceTensor> {
        let src = match &w.data {
            WeightData::F32(d) => GatherSrc::F32(d),
            WeightData::Bf16(d) => GatherSrc::Bf16(d),
        };
        self.gather(&src, w.rows, w.cols, idx)
    }

    fn gather(
        &self,
        src: &GatherSrc<'_>,
        n: usize,
        cols: usize,
        idx: &[usize],
    ) -> Result<DeviceTensor> {
        if let Some(&bad) = idx.iter().find(|&&i| i >= n) {
            return Err(invalid(
                "gather_rows",
                format!("row {bad} of a table with {n} rows"),
            ));
        }
        let rows = idx.len();
        let mut y = self.zeros(vec![rows, cols])?;
        if rows * cols == 0 {
            return Ok(y);
        }
        let ids: Vec<i32> = idx
            .iter()
            .map(|&i| i32_of("gather_rows", i))
            .collect::<Result<_>>()?;
        let ids = self.stream.clone_htod(&ids).map_err(driver)?;
        let (r, c) = (i32_of("gather_rows", rows)?, i32_of("gather_rows", cols)?);
        let cfg = grid(rows * cols, 256)?;
        match src {
            GatherSrc::F32(t) => {
                let mut b = self.stream.launch_builder(&self.k.gather_rows);
                b.arg(*t).arg(&ids).arg(&mut y.data).arg(&r).arg(&c);
                // SAFETY: one thread per output element; every index is < n (checked), the table
                // holds n·cols elements and y rows·cols.
                unsafe { b.launch(cfg) }.map_err(driver)?;
            }
            GatherSrc::Bf16(t) => {
                let mut b = self.stream.launch_builder(&self.k.gather_rows_bf16);
                b.arg(*t).arg(&ids).arg(&mut y.data).arg(&r).arg(&c);
                // SAFETY: as above, for a bf16 table.
                unsafe { b.launch(cfg) }.map_err(driver)?;
            }
        }
        Ok(y)
    }

    /// `x += y` (same element count).
    pub fn add_inplace(&self, x: &mut DeviceTensor, y: &DeviceTensor) -> Result<()> {
        let n = x.len();
        if y.len() != n {
            return Err(invalid(
                "add_inplace",
                format!("{:?} += {:?}", x.shape, y.shape),
            ));
        }
        if n == 0 {
            return Ok(());
        }
        let n64 = n as u64;
        let mut b = self.stream.launch_builder(&self.k.add_inplace);
        b.arg(&mut x.data).arg(&y.data).arg(&n64);
        // SAFETY: one thread per element of two buffers of n elements.
        unsafe { b.launch(grid(n, 256)?) }.map_err(driver)?;
        Ok(())
    }

    /// `y[r, :] += bias` for a `[rows, cols]` y.
    pub fn add_bias(&self, y: &mut DeviceTensor, bias: &DeviceTensor) -> Result<()> {
        let (rows, cols) = y.dims2("add_bias")?;
        if bias.len() != cols {
            return Err(invalid(
                "add_bias",
                format!("bias of {} for rows of {cols}", bias.len()),
            ));
        }
        if rows * cols == 0 {
            return Ok(());
        }
        let (r, c) = (i32_of("add_bias", rows)?, i32_of("add_bias", cols)?);
        let mut b = self.stream.launch_builder(&self.k.add_bias);
        b.arg(&mut y.data).arg(&bias.data).arg(&r).arg(&c);
        // SAFETY: one thread per element of y (rows·cols); bias holds cols.
        unsafe { b.launch(grid(rows * cols, 256)?) }.map_err(driver)?;
        Ok(())
    }

    /// Columns `off..off + width` of every row of a `[rows, cols]` x → `[rows, width]`.
    pub fn columns(&self, x: &DeviceTensor, off: usize, width: usize) -> Result<DeviceTensor> {
        let (rows, cols) = x.dims2("columns")?;
        if off + width > cols {
            return Err(invalid(
                "columns",
                format!("columns {off}..{} of {cols}", off + width),
            ));
        }
        let mut y = self.zeros(vec![rows, width])?;
        if rows * width == 0 {
            return Ok(y);
        }
        let (r, c, o, w) = (
            i32_of("columns", rows)?,
            i32_of("columns", cols)?,
            i32_of("columns", off)?,
            i32_of("columns", width)?,
        );
        let mut b = self.stream.launch_builder(&self.k.copy_cols);
        b.arg(&x.data)
            .arg(&r)
            .arg(&c)
            .arg(&o)
            .arg(&w)
            .arg(&mut y.data);
        // SAFETY: one thread per output element; reads stay within rows·cols (off + width ≤ cols).
        unsafe { b.launch(grid(rows * width, 256)?) }.map_err(driver)?;
        Ok(y)
    }

    /// Rows `start..end` of a `[rows, cols]` x, copied.
    pub fn rows(&self, x: &DeviceTensor, start: usize, end: usize) -> Result<DeviceTensor> {
        let (rows, cols) = x.dims2("rows")?;
        if start > end || end > rows {
            return Err(invalid("rows", format!("rows {start}..{end} of {rows}")));
        }
        let mut y = self.zeros(vec![end - start, cols])?;
        if end > start && cols > 0 {
            self.stream
                .memcpy_dtod(
                    &x.data.slice(start * cols..end * cols),
                    &mut y.data.slice_mut(..(end - start) * cols),
                )
                .map_err(driver)?;
        }
        Ok(y)
    }

    /// Rows `r0..` of `[rows, cols]` x overwritten by `part` (device copy).
    pub(crate) fn copy_rows_into(
        &self,
        x: &mut DeviceTensor,
        r0: usize,
        part: &DeviceTensor,
    ) -> Result<()> {
        let (rows, cols) = x.dims2("set_rows")?;
        let (n, pc) = part.dims2("set_rows")?;
        if pc != cols || r0 + n > rows {
            return Err(invalid(
                "set_rows",
                format!("{n} rows of {pc} at row {r0} of [{rows}, {cols}]"),
            ));
        }
        if n * cols > 0 {
            self.stream
                .memcpy_dtod(
                    &part.data.slice(..n * cols),
                    &mut x.data.slice_mut(r0 * cols..(r0 + n) * cols),
                )
                .map_err(driver)?;
        }
        Ok(())
    }

    /// The `[rows_i, cols]` tensors stacked in order → `[Σ rows_i, cols]` (device copies).
    pub fn concat_rows(&self, parts: &[DeviceTensor]) -> Result<DeviceTensor> {
        let cols = match parts.first() {
            Some(p) => p.dims2("concat_rows")?.1,
            None => return Err(invalid("concat_rows", "nothing to concatenate".into())),
        };
        let mut total = 0;
        for p in parts {
            let (r, c) = p.dims2("concat_rows")?;
            if c != cols {
                return Err(invalid(
                    "concat_rows",
                    format!("a part of {c} columns among parts of {cols}"),
                ));
            }
            total += r;
        }
        let mut y = self.zeros(vec![total, cols])?;
        let mut at = 0;
        for p in parts {
            let n = p.len();
            if n > 0 {
                self.stream
                    .memcpy_dtod(&p.data.slice(..n), &mut y.data.slice_mut(at..at + n))
                    .map_err(driver)?;
            }
            at += n;
        }
        Ok(y)
    }

    /// Host words to the device (headers of the expert dispatch). Never empty: an empty input
    /// gives one zero word, since a zero-length device allocation is not allowed.
    pub(crate) fn upload_words(&self, v: &[u32]) -> Result<CudaSlice<u32>> {
        if v.is_empty() {
            return self.stream.alloc_zeros::<u32>(1).map_err(driver);
        }
        self.stream.clone_htod(v).map_err(driver)
    }

    /// A zeroed word buffer of `n` (at least one) elements.
    pub(crate) fn zero_words(&self, n: usize) -> Result<CudaSlice<u32>> {
        self.stream.alloc_zeros::<u32>(n.max(1)).map_err(driver)
    }

    /// Device words back to the host (waits for the stream, and through the buffer's events for
    /// any transfer writing it on another stream).
    pub(crate) fn download_words(&self, v: &CudaSlice<u32>) -> Result<Vec<u32>> {
        self.stream.clone_dtoh(v).map_err(driver)
    }

    /// Forms an NCCL group over the ranks of `comm` (the unique id travels through it) on this
    /// backend's context, so NCCL's stream and the compute stream share buffers with their uses
    /// ordered by cudarc's events.
    pub fn join_nccl(
        &self,
        comm: &ringmoe_comm::Communicator,
        timeout: std::time::Duration,
    ) -> Result<ringmoe_comm::nccl::NcclCommunicator> {
        let id = ringmoe_comm::nccl::exchange_id(comm)?;
        Ok(ringmoe_comm::nccl::NcclCommunicator::on_context(
            comm.rank(),
            comm.world_size(),
            &id,
            &self.ctx,
            timeout,
        )?)
    }

    /// MoE combine: `out[t] = Σ_j weight[t, j] · y[row[t, j]]` over `[tokens, k]` slots, added in
    /// the order given, for expert outputs `y` `[rows, hidden]`.
    pub fn combine(
        &self,
        y: &DeviceTensor,
        row: &[usize],
        weight: &[f32],
        k: usize,
    ) -> Result<DeviceTensor> {
        let (rows, hidden) = y.dims2("combine")?;
        if k == 0 || row.len() != weight.len() || !row.len().is_multiple_of(k) {
            return Err(invalid(
                "combine",
                format!(
                    "{} rows and {} weights for top-{k}",
                    row.len(),
                    weight.len()
                ),
            ));
        }
        let tokens = row.len() / k;
        if let Some(bad) = row.iter().find(|&&r| r >= rows) {
            return Err(invalid(
                "combine",
                format!("slot row {bad} of {rows} expert output rows"),
            ));
        }
        let ids: Vec<i32> = row
            .iter()
            .map(|&r| i32_of("combine", r))
            .collect::<Result<_>>()?;
        let mut out = self.zeros(vec![tokens, hidden])?;
        if tokens * hidden == 0 {
            return Ok(out);
        }
        let ids = self.stream.clone_htod(&ids).map_err(driver)?;
        let ws = self.stream.clone_htod(weight).map_err(driver)?;
        let (t, kk, h) = (
            i32_of("combine", tokens)?,
            i32_of("combine", k)?,
            i32_of("combine", hidden)?,
        );
        let mut b = self.stream.launch_builder(&self.k.combine);
        b.arg(&y.data)
            .arg(&ids)
            .arg(&ws)
            .arg(&mut out.data)
            .arg(&t)
            .arg(&kk)
            .arg(&h);
        // SAFETY: one thread per output element (tokens·hidden); every row index is < rows
        // (checked), y holds rows·hidden, ids and ws tokens·k.
        unsafe { b.launch(grid(tokens * hidden, 256)?) }.map_err(driver)?;
        Ok(out)
    }

    /// `y[r] += sigmoid(gate[r]) · s[r]` for `[rows, cols]` y and s and a `[rows, 1]` gate.
    pub fn add_gated(
        &self,
        y: &mut DeviceTensor,
        s: &DeviceTensor,
        gate: &DeviceTensor,
    ) -> Result<()> {
        let (rows, cols) = y.dims2("add_gated")?;
        if s.len() != rows * cols || gate.len() != rows {
            return Err(invalid(
                "add_gated",
                format!("y {:?}, s {:?}, gate {:?}", y.shape, s.shape, gate.shape),
            ));
        }
        if rows * cols == 0 {
            return Ok(());
        }
        let (r, c) = (i32_of("add_gated", rows)?, i32_of("add_gated", cols)?);
        let mut b = self.stream.launch_builder(&self.k.add_gated);
        b.arg(&mut y.data)
            .arg(&s.data)
            .arg(&gate.data)
            .arg(&r)
            .arg(&c);
        // SAFETY: one thread per element of y; s holds as many, gate one per row.
        unsafe { b.launch(grid(rows * cols, 256)?) }.map_err(driver)?;
        Ok(())
    }

    /// Exact merge of a partial attention `(o2, l2)` into `(out, lse)` (the same queries over
    /// disjoint keys), as `ringmoe_core::merge_into`: the ring attention step.
    pub fn merge_attention(
        &self,
        out: &mut DeviceTensor,
        lse: &mut DeviceTensor,
        o2: &DeviceTensor,
        l2: &DeviceTensor,
    ) -> Result<()> {
        let rows = lse.len();
        if l2.len() != rows
            || o2.len() != out.len()
            || (rows > 0 && !out.len().is_multiple_of(rows))
        {
            return Err(invalid(
                "merge_attention",
                format!(
                    "out {:?} lse {:?} with o2 {:?} l2 {:?}",
                    out.shape, lse.shape, o2.shape, l2.shape
                ),
            ));
        }
        if rows == 0 || out.is_empty() {
            return Ok(());
        }
        let d = out.len() / rows;
        let (r, di) = (i32_of("merge", rows)?, i32_of("merge", d)?);
        let mut b = self.stream.launch_builder(&self.k.merge_attention);
        b.arg(&mut out.data)
            .arg(&lse.data)
            .arg(&o2.data)
            .arg(&l2.data)
            .arg(&r)
            .arg(&di);
        // SAFETY: one thread per element of out (rows·d); lse and l2 hold rows values.
        unsafe { b.launch(grid(rows * d, 256)?) }.map_err(driver)?;
        let mut b = self.stream.launch_builder(&self.k.merge_lse);
        b.arg(&mut lse.data).arg(&l2.data).arg(&r);
        // SAFETY: one thread per row; ordered on the stream after the output merge, which read
        // the old lse.
        unsafe { b.launch(grid(rows, 256)?) }.map_err(driver)?;
        Ok(())
    }

    /// An empty K/V cache for rows of `width` (= kv_heads · head_dim).
    pub fn new_kv(&self, width: usize) -> Result<DeviceKv> {
        Ok(DeviceKv {
            k: self.stream.alloc_zeros::<f32>(1).map_err(driver)?,
            v: self.stream.alloc_zeros::<f32>(1).map_err(driver)?,
            pos: self.stream.alloc_zeros::<i32>(1).map_err(driver)?,
            positions: Vec::new(),
            width,
            cap: 0,
        })
    }

    /// Appends new tokens' K/V (`positions.len()` rows of the cache's width, any leading shape).
    pub fn kv_append(
        &self,
        kv: &mut DeviceKv,
        k: &DeviceTensor,
        v: &DeviceTensor,
        positions: &[usize],
    ) -> Result<()> {
        let n = positions.len();
        if k.len() != n * kv.width || v.len() != n * kv.width {
            return Err(invalid(
                "kv_append",
                format!(
                    "k {:?} and v {:?} for {n} positions of width {}",
                    k.shape, v.shape, kv.width
                ),
            ));
        }
        if n == 0 {
            return Ok(());
        }
        let pos = positions_i32(positions)?;
        let (len, w) = (kv.len(), kv.width);
        if len + n > kv.cap {
            let cap = (len + n).max(2 * kv.cap).max(256);
            let mut k2 = self.stream.alloc_zeros::<f32>(cap * w).map_err(driver)?;
            let mut v2 = self.stream.alloc_zeros::<f32>(cap * w).map_err(driver)?;
            let mut p2 = self.stream.alloc_zeros::<i32>(cap).map_err(driver)?;
            if len > 0 {
                self.stream
                    .memcpy_dtod(&kv.k.slice(..len * w), &mut k2.slice_mut(..len * w))
                    .map_err(driver)?;
                self.stream
                    .memcpy_dtod(&kv.v.slice(..len * w), &mut v2.slice_mut(..len * w))
                    .map_err(driver)?;
                self.stream
                    .memcpy_dtod(&kv.pos.slice(..len), &mut p2.slice_mut(..len))
                    .map_err(driver)?;
            }
            (kv.k, kv.v, kv.pos, kv.cap) = (k2, v2, p2, cap);
        }
        self.stream
            .memcpy_dtod(
                &k.data.slice(..n * w),
                &mut kv.k.slice_mut(len * w..(len + n) * w),
            )
            .map_err(driver)?;
        self.stream
            .memcpy_dtod(
                &v.data.slice(..n * w),
                &mut kv.v.slice_mut(len * w..(len + n) * w),
            )
            .map_err(driver)?;
        self.stream
            .memcpy_htod(&pos, &mut kv.pos.slice_mut(len..len + n))
            .map_err(driver)?;
        kv.positions.extend_from_slice(positions);
        Ok(())
    }

    /// `silu(gate) ⊙ up` of a fused `[rows, 2·inter]` buffer → `[rows, inter]`.
    pub fn swiglu(&self, gate_up: &DeviceTensor) -> Result<DeviceTensor> {
        let (rows, two) = gate_up.dims2("swiglu")?;
        if two % 2 != 0 {
            return Err(invalid("swiglu", format!("odd fused width {two}")));
        }
        let inter = two / 2;
        let mut y = self.zeros(vec![rows, inter])?;
        if rows * inter == 0 {
            return Ok(y);
        }
        let (r, i) = (i32_of("swiglu", rows)?, i32_of("swiglu", inter)?);
        let mut b = self.stream.launch_builder(&self.k.swiglu);
        b.arg(&gate_up.data).arg(&mut y.data).arg(&r).arg(&i);
        // SAFETY: one thread per output element; gate_up holds rows·2·inter, y rows·inter.
        unsafe { b.launch(grid(rows * inter, 256)?) }.map_err(driver)?;
        Ok(y)
    }

    /// Router: softmax over `[rows, experts]` logits, the `k` largest per row (ties to the lower
    /// id), renormalised when asked. Returns `(weights, ids)`, `[rows, k]` each, on the host.
    pub fn router_topk(
        &self,
        logits: &DeviceTensor,
        k: usize,
        renorm: bool,
    ) -> Result<(Vec<f32>, Vec<u32>)> {
        let (rows, experts) = logits.dims2("router_topk")?;
        if k == 0 || k > experts {
            return Err(invalid(
                "router_topk",
                format!("top-{k} of {experts} experts"),
            ));
        }
        if rows == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut w = self.stream.alloc_zeros::<f32>(rows * k).map_err(driver)?;
        let mut ids = self.stream.alloc_zeros::<i32>(rows * k).map_err(driver)?;
        let (r, e, kk, rn) = (
            i32_of("router_topk", rows)?,
            i32_of("router_topk", experts)?,
            i32_of("router_topk", k)?,
            i32::from(renorm),
        );
        let mut b = self.stream.launch_builder(&self.k.router_topk);
        b.arg(&logits.data)
            .arg(&r)
            .arg(&e)
            .arg(&kk)
            .arg(&rn)
            .arg(&mut w)
            .arg(&mut ids);
        // SAFETY: one thread per row; logits hold rows·experts, the outputs rows·k.
        unsafe { b.launch(grid(rows, 128)?) }.map_err(driver)?;
        let w = self.stream.clone_dtoh(&w).map_err(driver)?;
        let ids = self.stream.clone_dtoh(&ids).map_err(driver)?;
        Ok((w, ids.into_iter().map(|i| i as u32).collect()))
    }

    /// Blockwise attention of `q` `[Lq, n_heads, head_dim]` (positions `q_pos`) over `k`/`v`
    /// `[Lk, n_kv_heads, head_dim]` (positions `k_pos`), as `ringmoe_core::attention_block`:
    /// returns `out` `[Lq, n_heads, head_dim]` and `lse` `[Lq, n_heads]`. head_dim ≤ 128.
    pub fn attention(
        &self,
        p: &AttentionParams,
        q: &DeviceTensor,
        q_pos: &[usize],
        k: &DeviceTensor,
        v: &DeviceTensor,
        k_pos: &[usize],
    ) -> Result<(DeviceTensor, DeviceTensor)> {
        let width = p.n_kv_heads * p.head_dim;
        if k.len() != k_pos.len() * width || v.len() != k.len() {
            return Err(invalid(
                "attention",
                format!(
                    "k {:?} and v {:?} for {} positions",
                    k.shape,
                    v.shape,
                    k_pos.len()
                ),
            ));
        }
        let kp = self
            .stream
            .clone_htod(&positions_i32(if k_pos.is_empty() { &[0] } else { k_pos })?)
            .map_err(driver)?;
        self.attention_views(
            p,
            q,
            q_pos,
            (&k.data.slice(..), &v.data.slice(..), &kp.slice(..)),
            k_pos.len(),
        )
    }

    /// K and V `[n, width]` back to back in one buffer `[2, n, width]`: one transfer per ring step.
    pub fn pack_kv(&self, k: &DeviceTensor, v: &DeviceTensor) -> Result<DeviceTensor> {
        let n = k.len();
        if v.len() != n {
            return Err(invalid(
                "pack_kv",
                format!("k {:?} and v {:?}", k.shape, v.shape),
            ));
        }
        let mut kv = self.zeros(vec![2, n])?;
        if n > 0 {
            self.stream
                .memcpy_dtod(&k.data.slice(..n), &mut kv.data.slice_mut(..n))
                .map_err(driver)?;
            self.stream
                .memcpy_dtod(&v.data.slice(..n), &mut kv.data.slice_mut(n..2 * n))
                .map_err(driver)?;
        }
        Ok(kv)
    }

    /// [`Self::attention`] over a block packed by [`Self::pack_kv`] (`[2, k_pos.len(), width]`).
    pub fn attention_packed(
        &self,
        p: &AttentionParams,
        q: &DeviceTensor,
        q_pos: &[usize],
        kv: &DeviceTensor,
        k_pos: &[usize],
    ) -> Result<(DeviceTensor, DeviceTensor)> {
        let n = k_pos.len() * p.n_kv_heads * p.head_dim;
        if kv.len() != 2 * n {
            return Err(invalid(
                "attention",
                format!(
                    "packed K/V {:?} for {} positions of {} kv heads × {}",
                    kv.shape,
                    k_pos.len(),
                    p.n_kv_heads,
                    p.head_dim
                ),
            ));
        }
        let kp = self
            .stream
            .clone_htod(&positions_i32(if k_pos.is_empty() { &[0] } else { k_pos })?)
            .map_err(driver)?;
        let (k, v) = if n == 0 {
            (kv.data.slice(..), kv.data.slice(..))
        } else {
            (kv.data.slice(..n), kv.data.slice(n..2 * n))
        };
        self.attention_views(p, q, q_pos, (&k, &v, &kp.slice(..)), k_pos.len())
    }

    /// [`Self::attention`] of `q` over everything in a K/V cache.
    pub fn attention_cached(
        &self,
        p: &AttentionParams,
        q: &DeviceTensor,
        q_pos: &[usize],
        kv: &DeviceKv,
    ) -> Result<(DeviceTensor, DeviceTensor)> {
        if kv.width != p.n_kv_heads * p.head_dim {
            return Err(invalid(
                "attention",
                format!(
                    "cache rows of {} for {} kv heads of dim {}",
                    kv.width, p.n_kv_heads, p.head_dim
                ),
            ));
        }
        self.attention_views(
            p,
            q,
            q_pos,
            (&kv.k.slice(..), &kv.v.slice(..), &kv.pos.slice(..)),
            kv.len(),
        )
    }

    /// The launch behind both: `lk` keys at the start of the views (which may be longer).
    fn attention_views(
        &self,
        p: &AttentionParams,
        q: &DeviceTensor,
        q_pos: &[usize],
        (k, v, kp): (&CudaView<'_, f32>, &CudaView<'_, f32>, &CudaView<'_, i32>),
        lk: usize,
    ) -> Result<(DeviceTensor, DeviceTensor)> {
        let (lq, h, hkv, d) = (q_pos.len(), p.n_heads, p.n_kv_heads, p.head_dim);
        if d == 0 || d > 128 || hkv == 0 || h % hkv != 0 {
            return Err(invalid(
                "attention",
                format!("{h} heads over {hkv} kv heads of dim {d} (the kernel takes dim ≤ 128)"),
            ));
        }
        if q.len() != lq * h * d
            || k.len() < lk * hkv * d
            || v.len() < lk * hkv * d
            || kp.len() < lk
        {
            return Err(invalid(
                "attention",
                format!("q {:?} for {lq} positions over {lk} keys", q.shape),
            ));
        }
        let mut out = self.zeros(vec![lq, h, d])?;
        let mut lse = self.zeros(vec![lq, h])?;
        if lq == 0 {
            return Ok((out, lse));
        }
        let qp = self
            .stream
            .clone_htod(&positions_i32(q_pos)?)
            .map_err(driver)?;
        let cfg = LaunchConfig {
            grid_dim: (
                u32::try_from(lq.div_ceil(16)).map_err(|_| invalid("attention", "Lq".into()))?,
                u32::try_from(h).map_err(|_| invalid("attention", "heads".into()))?,
                1,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (lqi, lki, hi, hkvi, di) = (
            i32_of("attention", lq)?,
            i32_of("attention", lk)?,
            i32_of("attention", h)?,
            i32_of("attention", hkv)?,
            i32_of("attention", d)?,
        );
        let causal = i32::from(p.causal);
        let mut b = self.stream.launch_builder(&self.k.attention);
        b.arg(&q.data)
            .arg(&qp)
            .arg(k)
            .arg(v)
            .arg(kp)
            .arg(&mut out.data)
            .arg(&mut lse.data)
            .arg(&lqi)
            .arg(&lki)
            .arg(&hi)
            .arg(&hkvi)
            .arg(&di)
            .arg(&p.scale)
            .arg(&causal);
        // SAFETY: grid (ceil(Lq/16), heads) × 128 threads, the layout the kernel assumes; every
        // buffer holds at least the element counts checked above (the kernel reads lk keys);
        // head_dim ≤ 128 fits its shared tiles.
        unsafe { b.launch(cfg) }.map_err(driver)?;
        Ok((out, lse))
    }

    /// The context, for code that shares it (NCCL on the same device).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
}
