// ringmoe's CUDA kernels, compiled at start by NVRTC (no CUDA headers needed: bf16 is handled
// as raw 16-bit values). Layouts are row-major and match ringmoe-core's CPU kernels, which are
// the reference `ringmoe gpu-check` compares against.

// NVRTC has no standard headers: our own 64-bit index type.
typedef unsigned long long u64;

#define INF_F __int_as_float(0x7f800000)

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ int warp_min_i(int v) {
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// f32 -> bf16 with round-to-nearest-even (NaN stays NaN).
__device__ __forceinline__ unsigned short f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

__device__ __forceinline__ float bf16_to_f32(unsigned short b) {
    return __uint_as_float(((unsigned int)b) << 16);
}

extern "C" __global__ void to_bf16(const float* x, unsigned short* y, u64 n) {
    u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    if (i < n) y[i] = f32_to_bf16(x[i]);
}

extern "C" __global__ void from_bf16(const unsigned short* x, float* y, u64 n) {
    u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    if (i < n) y[i] = bf16_to_f32(x[i]);
}

// y = w * x / sqrt(mean(x^2) + eps), one block (a power of two, <= 1024 threads) per row.
extern "C" __global__ void rms_norm(const float* x, const float* w, float* y, int rows, int dim,
                                    float eps) {
    extern __shared__ float red[];
    int row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + (u64)row * dim;
    float* yr = y + (u64)row * dim;
    float ss = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
    red[threadIdx.x] = ss;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    float inv = 1.0f / sqrtf(red[0] / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = w[i] * (xr[i] * inv);
}

// Rotate-half RoPE in place on x [tokens, heads, head_dim]; cos/sin [tokens, half]; only the
// first 2*half dimensions of a head rotate.
extern "C" __global__ void rope(float* x, const float* cs, const float* sn, int tokens, int heads,
                                int head_dim, int half) {
    u64 idx = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    u64 total = (u64)tokens * heads * half;
    if (idx >= total) return;
    int i = (int)(idx % half);
    u64 th = idx / half;
    int t = (int)(th / heads);
    float* h = x + th * head_dim;
    float c = cs[(u64)t * half + i], s = sn[(u64)t * half + i];
    float a = h[i], b = h[i + half];
    h[i] = a * c - b * s;
    h[i + half] = b * c + a * s;
}

// silu(gate) * up on gate_up [rows, 2*inter] laid out [gate | up] per row -> y [rows, inter].
extern "C" __global__ void swiglu(const float* gu, float* y, int rows, int inter) {
    u64 idx = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    if (idx >= (u64)rows * inter) return;
    int r = (int)(idx / inter), c = (int)(idx % inter);
    float g = gu[(u64)r * 2 * inter + c], u = gu[(u64)r * 2 * inter + inter + c];
    y[idx] = g / (1.0f + expf(-g)) * u;
}

// y[r, :] = table[idx[r], :] for an f32 table: embedding lookups and the MoE dispatch
// permutation (grouped row r takes its token's hidden state).
extern "C" __global__ void gather_rows(const float* table, const int* idx, float* y, int rows,
                                       int cols) {
    u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    if (i >= (u64)rows * cols) return;
    int r = (int)(i / cols), c = (int)(i % cols);
    y[i] = table[(u64)idx[r] * cols + c];
}

// gather_rows from a bf16 table, widened to f32.
extern "C" __global__ void gather_rows_bf16(const unsigned short* table, const int* idx, float* y,
                                            int rows, int cols) {
    u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    if (i >= (u64)rows * cols) return;
    int r = (int)(i / cols), c = (int)(i % cols);
    y[i] = bf16_to_f32(table[(u64)idx[r] * cols + c]);
}

// x += y elementwise (residual connections).
extern "C" __global__ void add_inplace(float* x, const float* y, u64 n) {
    u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// y[r, c] += b[c].
extern "C" __global__ void add_bias(float* y, const float* b, int rows, int cols) {
    u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    if (i < (u64)rows * cols) y[i] += b[i % cols];
}

// dst[r, 0..w] = src[r, off..off + w] with src rows of `width`: splitting fused projections.
extern "C" __global__ void copy_cols(const float* src, int rows, int width, int off, int w,
                                     float* dst) {
    u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    if (i >= (u64)rows * w) return;
    int r = (int)(i / w), c = (int)(i % w);
    dst[i] = src[(u64)r * width + off + c];
}

// MoE combine: out[t, c] = sum over j of weight[t, j] * y[row[t, j], c], the j in the order
// given (the host sorts each token's slots by expert id, transformers' order).
extern "C" __global__ void combine(const float* y, const int* row, const float* weight,
                                   float* out, int tokens, int k, int cols) {
    u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    if (i >= (u64)tokens * cols) return;
    int t = (int)(i / cols), c = (int)(i % cols);
    float acc = 0.f;
    for (int j = 0; j < k; j++) {
        acc += y[(u64)row[(u64)t * k + j] * cols + c] * weight[(u64)t * k + j];
    }
    out[i] = acc;
}

// Qwen2-MoE's shared expert: y[r, c] += sigmoid(g[r]) * s[r, c].
extern "C" __global__ void add_gated(float* y, const float* s, const float* g, int rows,
                                     int cols) {
    u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    if (i >= (u64)rows * cols) return;
    float gv = 1.0f / (1.0f + expf(-g[i / cols]));
    y[i] += gv * s[i];
}

// Exact merge of two partial attentions over disjoint key sets, in place in (out, lse):
// rows = tokens x heads, each of d values. As ringmoe-core's merge_into.
extern "C" __global__ void merge_attention(float* out, float* lse, const float* o2,
                                           const float* l2, int rows, int d) {
    u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    if (i >= (u64)rows * d) return;
    u64 r = i / d;
    float la = lse[r], lb = l2[r];
    float m = fmaxf(la, lb);
    if (m == -INF_F) return;
    float wa = expf(la - m), wb = expf(lb - m);
    float inv = 1.0f / (wa + wb);
    out[i] = wa * inv * out[i] + wb * inv * o2[i];
}

// The lse half of merge_attention, run after it (one thread per row).
extern "C" __global__ void merge_lse(float* lse, const float* l2, int rows) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float la = lse[r], lb = l2[r];
    float m = fmaxf(la, lb);
    if (m == -INF_F) return;
    lse[r] = m + log1pf(expf(-fabsf(la - lb)));
}

// Router: softmax over experts, then the k largest (ties to the lower id), optionally
// renormalised to sum to one. One thread per row (experts <= a few hundred).
extern "C" __global__ void router_topk(const float* logits, int rows, int experts, int k,
                                       int renorm, float* weights, int* ids) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const float* l = logits + (u64)r * experts;
    float mx = -INF_F;
    for (int e = 0; e < experts; e++) mx = fmaxf(mx, l[e]);
    float sum = 0.f;
    for (int e = 0; e < experts; e++) sum += expf(l[e] - mx);
    float total = 0.f;
    for (int j = 0; j < k; j++) {
        int best = -1;
        float bv = -INF_F;
        for (int e = 0; e < experts; e++) {
            bool taken = false;
            for (int i = 0; i < j; i++) taken |= ids[(u64)r * k + i] == e;
            if (!taken && (best < 0 || l[e] > bv)) {
                best = e;
                bv = l[e];
            }
        }
        float p = expf(bv - mx) / sum;
        ids[(u64)r * k + j] = best;
        weights[(u64)r * k + j] = p;
        total += p;
    }
    if (renorm && total > 0.f)
        for (int j = 0; j < k; j++) weights[(u64)r * k + j] /= total;
}

// Blockwise attention with an online softmax, returning (out, lse) like ringmoe-core's
// attention_block: q [lq, heads, d], k/v [lk, kv_heads, d], absolute positions q_pos/k_pos,
// causal = mask keys whose position is greater than the query's. Grid (ceil(lq/16), heads),
// 128 threads: each warp owns 4 query rows; key tiles of 32 rows sit in shared memory. A tile
// that the causal mask removes for the whole block is skipped. d <= 128.
#define ATT_BK 32
#define ATT_RPW 4
#define ATT_WARPS 4
#define ATT_BQ (ATT_RPW * ATT_WARPS)
#define ATT_MAXD 128
#define ATT_C (ATT_MAXD / 32)

extern "C" __global__ void __launch_bounds__(128)
attention(const float* q, const int* q_pos, const float* k, const float* v, const int* k_pos,
          float* out, float* lse, int lq, int lk, int heads, int kv_heads, int d, float scale,
          int causal) {
    __shared__ float ks[ATT_BK][ATT_MAXD + 1];
    __shared__ float vs[ATT_BK][ATT_MAXD + 1];
    __shared__ int kp[ATT_BK];
    __shared__ int max_q;
    const int h = blockIdx.y;
    const int kvh = h / (heads / kv_heads);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float qr[ATT_RPW][ATT_C], acc[ATT_RPW][ATT_C], m[ATT_RPW], l[ATT_RPW];
    int qp[ATT_RPW];
    bool valid[ATT_RPW];
    if (threadIdx.x == 0) max_q = -2147483647 - 1;
    __syncthreads();
#pragma unroll
    for (int r = 0; r < ATT_RPW; r++) {
        int i = blockIdx.x * ATT_BQ + warp * ATT_RPW + r;
        valid[r] = i < lq;
        qp[r] = valid[r] ? q_pos[i] : (-2147483647 - 1);
#pragma unroll
        for (int c = 0; c < ATT_C; c++) {
            int dd = lane + 32 * c;
            qr[r][c] = (valid[r] && dd < d) ? q[((u64)i * heads + h) * d + dd] * scale : 0.f;
            acc[r][c] = 0.f;
        }
        m[r] = -INF_F;
        l[r] = 0.f;
        if (valid[r] && lane == 0) atomicMax(&max_q, qp[r]);
    }
    __syncthreads();
    for (int t0 = 0; t0 < lk; t0 += ATT_BK) {
        for (int idx = threadIdx.x; idx < ATT_BK * d; idx += blockDim.x) {
            int j = idx / d, dd = idx % d, kj = t0 + j;
            float kv = 0.f, vv = 0.f;
            if (kj < lk) {
                u64 off = ((u64)kj * kv_heads + kvh) * d + dd;
                kv = k[off];
                vv = v[off];
            }
            ks[j][dd] = kv;
            vs[j][dd] = vv;
        }
        if (threadIdx.x < ATT_BK) {
            int kj = t0 + threadIdx.x;
            kp[threadIdx.x] = kj < lk ? k_pos[kj] : 2147483647;
        }
        __syncthreads();
        int kmin = warp_min_i(kp[lane]);
        bool skip = causal && kmin > max_q;  // the same in every warp
        if (!skip) {
#pragma unroll
            for (int r = 0; r < ATT_RPW; r++) {
                if (!valid[r]) continue;  // uniform within the warp
                // Lane j scores key t0 + j against this row's query (spread over the lanes).
                float s = 0.f;
#pragma unroll
                for (int c = 0; c < ATT_C; c++) {
                    for (int src = 0; src < 32; src++) {
                        int dd = src + 32 * c;
                        float qv = __shfl_sync(0xffffffffu, qr[r][c], src);
                        if (dd < d) s += qv * ks[lane][dd];
                    }
                }
                bool ok = (t0 + lane < lk) && (!causal || kp[lane] <= qp[r]);
                s = ok ? s : -INF_F;
                float mnew = fmaxf(m[r], warp_max(s));
                if (mnew == -INF_F) continue;  // nothing unmasked yet: uniform
                float p = ok ? expf(s - mnew) : 0.f;
                float alpha = expf(m[r] - mnew);
                l[r] = l[r] * alpha + warp_sum(p);
#pragma unroll
                for (int c = 0; c < ATT_C; c++) acc[r][c] *= alpha;
                for (int j = 0; j < ATT_BK; j++) {
                    float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
                    for (int c = 0; c < ATT_C; c++) {
                        int dd = lane + 32 * c;
                        if (dd < d) acc[r][c] += pj * vs[j][dd];
                    }
                }
                m[r] = mnew;
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < ATT_RPW; r++) {
        if (!valid[r]) continue;
        int i = blockIdx.x * ATT_BQ + warp * ATT_RPW + r;
        float inv = l[r] > 0.f ? 1.0f / l[r] : 0.f;
#pragma unroll
        for (int c = 0; c < ATT_C; c++) {
            int dd = lane + 32 * c;
            if (dd < d) out[((u64)i * heads + h) * d + dd] = acc[r][c] * inv;
        }
        if (lane == 0) lse[(u64)i * heads + h] = l[r] > 0.f ? m[r] + logf(l[r]) : -INF_F;
    }
}
