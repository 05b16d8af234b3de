//! The CUDA backend proper; the only module of this crate that calls CUDA (cudarc).

use std::sync::Arc;

use cudarc::cublas::{CudaBlas, sys as blas_sys};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::{CompileOptions, Ptx, compile_ptx_with_opts};
use half::bf16;
use ringmoe_core::rope::RopeTable;
use ringmoe_core::{AttentionParams, Tensor};

use crate::{CudaError, KERNELS, Result};

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

    fn dims2(&self, op: &'static str) -> Result<(usize, usize)> {
        match self.shape[..] {
            [a, b] => Ok((a, b)),
            _ => Err(invalid(
                op,
                format!("expected a matrix, got {:?}", self.shape),
            )),
        }
    }
}

/// A bf16 weight matrix `[rows, cols]` in device memory, uploaded once.
#[derive(Debug)]
pub struct DeviceWeight {
    data: CudaSlice<bf16>,
    rows: usize,
    cols: usize,
}

impl DeviceWeight {
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }
}

struct Kernels {
    to_bf16: CudaFunction,
    from_bf16: CudaFunction,
    rms_norm: CudaFunction,
    rope: CudaFunction,
    swiglu: CudaFunction,
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
        let stream = ctx.default_stream();
        let ptx = compile(major, minor)?;
        let module = ctx.load_module(ptx).map_err(driver)?;
        let f = |name: &str| module.load_function(name).map_err(driver);
        let k = Kernels {
            to_bf16: f("to_bf16")?,
            from_bf16: f("from_bf16")?,
            rms_norm: f("rms_norm")?,
            rope: f("rope")?,
            swiglu: f("swiglu")?,
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

    fn zeros(&self, shape: Vec<usize>) -> Result<DeviceTensor> {
        let n = shape.iter().product::<usize>();
        Ok(DeviceTensor {
            data: self.stream.alloc_zeros::<f32>(n.max(1)).map_err(driver)?,
            shape,
        })
    }

    /// A `[rows, cols]` weight, converted to bf16 on the host (round to nearest even) and uploaded.
    pub fn upload_bf16(&self, t: &Tensor) -> Result<DeviceWeight> {
        let (rows, cols) = t.dims2("upload_bf16")?;
        let h: Vec<bf16> = t.as_slice().iter().map(|&x| bf16::from_f32(x)).collect();
        Ok(DeviceWeight {
            data: self.stream.clone_htod(&h).map_err(driver)?,
            rows,
            cols,
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

    /// `x · wᵀ` in f32: x `[m, k]`, w `[n, k]` → `[m, n]`.
    pub fn matmul_nt(&self, x: &DeviceTensor, w: &DeviceTensor) -> Result<DeviceTensor> {
        let (m, k) = x.dims2("matmul_nt")?;
        let (n, k2) = w.dims2("matmul_nt")?;
        if k != k2 {
            return Err(invalid(
                "matmul_nt",
                format!("x is [{m}, {k}] but w is [{n}, {k2}]"),
            ));
        }
        let mut y = self.zeros(vec![m, n])?;
        self.gemm_nt(
            (m, n, k),
            &x.data,
            blas_sys::cudaDataType::CUDA_R_32F,
            &w.data,
            blas_sys::cudaDataType::CUDA_R_32F,
            &mut y.data,
        )?;
        Ok(y)
    }

    /// `x · wᵀ` with bf16 inputs, f32 accumulation and f32 output (x is rounded to bf16 on the
    /// device first).
    pub fn matmul_nt_bf16(&self, x: &DeviceTensor, w: &DeviceWeight) -> Result<DeviceTensor> {
        let (m, k) = x.dims2("matmul_nt_bf16")?;
        if k != w.cols {
            return Err(invalid(
                "matmul_nt_bf16",
                format!("x is [{m}, {k}] but w is [{}, {}]", w.rows, w.cols),
            ));
        }
        let xb = self.to_bf16(x)?;
        let mut y = self.zeros(vec![m, w.rows])?;
        self.gemm_nt(
            (m, w.rows, k),
            &xb,
            blas_sys::cudaDataType::CUDA_R_16BF,
            &w.data,
            blas_sys::cudaDataType::CUDA_R_16BF,
            &mut y.data,
        )?;
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
    /// layout), `w[e]` is expert `e`'s `[n, k]` weight. Returns `[Σ rows, n]` in the same order.
    /// bf16 inputs and outputs with f32 accumulation (grouped GEMM takes one data type), the
    /// output widened to f32 by a kernel.
    pub fn grouped_matmul_nt_bf16(
        &self,
        x: &DeviceTensor,
        rows: &[usize],
        w: &[&DeviceWeight],
    ) -> Result<DeviceTensor> {
        let (total, k) = x.dims2("grouped_matmul_nt_bf16")?;
        if rows.len() != w.len() || rows.iter().sum::<usize>() != total {
            return Err(invalid(
                "grouped_matmul_nt_bf16",
                format!(
                    "{} row counts summing to {} for {} experts and {total} rows",
                    rows.len(),
                    rows.iter().sum::<usize>(),
                    w.len()
                ),
            ));
        }
        let n = w.first().map_or(0, |w| w.rows);
        if let Some(bad) = w.iter().find(|w| w.rows != n || w.cols != k) {
            return Err(invalid(
                "grouped_matmul_nt_bf16",
                format!(
                    "expert weights must all be [{n}, {k}]; one is {:?}",
                    bad.shape()
                ),
            ));
        }
        let xb = self.to_bf16(x)?;
        // SAFETY: written in full by the GEMMs below (every row belongs to one expert) before
        // it is read.
        let mut yb = unsafe { self.stream.alloc::<bf16>((total * n).max(1)) }.map_err(driver)?;
        let live: Vec<usize> = (0..rows.len()).filter(|&e| rows[e] > 0).collect();
        if !live.is_empty() && n > 0 {
            let (xp, _gx) = xb.device_ptr(&self.stream);
            let (yp, _gy) = yb.device_ptr_mut(&self.stream);
            let elem = std::mem::size_of::<bf16>() as u64;
            let mut a_ptrs = Vec::with_capacity(live.len());
            let mut b_ptrs = Vec::with_capacity(live.len());
            let mut c_ptrs = Vec::with_capacity(live.len());
            let mut guards = Vec::with_capacity(live.len());
            let mut offset = 0u64;
            for (e, &r) in rows.iter().enumerate() {
                if r > 0 {
                    let (wp, g) = w[e].data.device_ptr(&self.stream);
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
            // The dynamically loaded symbol is looked up on first use, and cudarc panics when
            // it is missing (cuBLAS older than 12.5): turn that into an error.
            let call = std::panic::catch_unwind(|| {
                // SAFETY: g groups of one problem each; the host arrays have g entries; the
                // device pointer arrays hold g pointers into live buffers sized for [n, k]
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
                        blas_sys::cudaDataType::CUDA_R_16BF,
                        ks.as_ptr(),
                        bp as *const *const _,
                        blas_sys::cudaDataType::CUDA_R_16BF,
                        ks.as_ptr(),
                        beta.as_ptr() as *const _,
                        cp as *const *mut _,
                        blas_sys::cudaDataType::CUDA_R_16BF,
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
        }
        let mut out = self.zeros(vec![total, n])?;
        let count = (total * n) as u64;
        if count > 0 {
            let mut b = self.stream.launch_builder(&self.k.from_bf16);
            b.arg(&yb).arg(&mut out.data).arg(&count);
            // SAFETY: both buffers hold at least total·n elements.
            unsafe { b.launch(grid(total * n, 256)?) }.map_err(driver)?;
        }
        Ok(out)
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

    /// Rotate-half RoPE in place on `x` `[tokens, heads, head_dim]` with the CPU's table.
    pub fn rope(
        &self,
        x: &mut DeviceTensor,
        heads: usize,
        head_dim: usize,
        table: &RopeTable,
    ) -> Result<()> {
        let half = table.half;
        let tokens = table.positions;
        if 2 * half > head_dim || x.data.len() != tokens * heads * head_dim {
            return Err(invalid(
                "rope",
                format!(
                    "x has {} elements for {tokens} tokens × {heads} heads × {head_dim}, rotary dim {}",
                    x.data.len(),
                    2 * half
                ),
            ));
        }
        if tokens * heads * half == 0 {
            return Ok(());
        }
        let cs = self.stream.clone_htod(&table.cos).map_err(driver)?;
        let sn = self.stream.clone_htod(&table.sin).map_err(driver)?;
        let (t, h, d, hf) = (
            i32_of("rope", tokens)?,
            i32_of("rope", heads)?,
            i32_of("rope", head_dim)?,
            i32_of("rope", half)?,
        );
        let mut b = self.stream.launch_builder(&self.k.rope);
        b.arg(&mut x.data)
            .arg(&cs)
            .arg(&sn)
            .arg(&t)
            .arg(&h)
            .arg(&d)
            .arg(&hf);
        // SAFETY: one thread per (token, head, pair) < tokens·heads·half; x holds
        // tokens·heads·head_dim elements and cos/sin tokens·half (checked above).
        unsafe { b.launch(grid(tokens * heads * half, 256)?) }.map_err(driver)?;
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
        let (lq, lk, h, hkv, d) = (
            q_pos.len(),
            k_pos.len(),
            p.n_heads,
            p.n_kv_heads,
            p.head_dim,
        );
        if d == 0 || d > 128 || hkv == 0 || h % hkv != 0 {
            return Err(invalid(
                "attention",
                format!("{h} heads over {hkv} kv heads of dim {d} (the kernel takes dim ≤ 128)"),
            ));
        }
        if q.data.len() != lq * h * d
            || k.data.len() != lk * hkv * d
            || v.data.len() != k.data.len()
        {
            return Err(invalid(
                "attention",
                format!(
                    "q {:?} for {lq} positions, k {:?} and v {:?} for {lk}",
                    q.shape, k.shape, v.shape
                ),
            ));
        }
        let mut out = self.zeros(vec![lq, h, d])?;
        let mut lse = self.zeros(vec![lq, h])?;
        if lq == 0 {
            return Ok((out, lse));
        }
        let to_i32 = |v: &[usize]| -> Result<Vec<i32>> {
            v.iter().map(|&x| i32_of("attention position", x)).collect()
        };
        let qp = self.stream.clone_htod(&to_i32(q_pos)?).map_err(driver)?;
        let kp = self
            .stream
            .clone_htod(&to_i32(if k_pos.is_empty() { &[0] } else { k_pos })?)
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
            .arg(&k.data)
            .arg(&v.data)
            .arg(&kp)
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
        // buffer holds the element counts checked above; head_dim ≤ 128 fits its shared tiles.
        unsafe { b.launch(cfg) }.map_err(driver)?;
        Ok((out, lse))
    }

    /// The context, for code that shares it (NCCL on the same device).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
}
