//! The building blocks the architecture files assemble: linear layers, attention with a KV cache,
//! the dense SwiGLU MLP, the sparse MoE block (with Qwen2-MoE's optional shared expert) and the
//! pre-norm decoder layer. Everything is f32 on the device of the tensors it holds.

use ringmoe_core::attention::{AttentionParams, PartialAttention, attention_block};
use ringmoe_core::gemm::Par;
use ringmoe_core::rope::{RopeFreqs, RopeTable, apply_rope};
use ringmoe_core::sparse::{AShape, Sparsity, attention_sparse};
use ringmoe_core::{Tensor, WeightPrecision, Weights, ops};

use crate::checkpoint::TensorSource;
use crate::config::ModelConfig;
use crate::kv_cache::LayerKv;
use crate::moe::{self, ExpertSet, ExpertWeights, Routing, TopKNorm};
use crate::{Error, Result};

/// `y = x Wᵀ (+ b)` with HF's `[out, in]` weight layout.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out_features, in_features]` in the load's weight precision (routers: always f32).
    pub weight: Weights,
    pub out_features: usize,
    pub in_features: usize,
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    /// Bytes held: the matrix in its precision, the bias in f32.
    pub fn bytes(&self) -> usize {
        self.weight.bytes() + self.bias.as_ref().map_or(0, |b| 4 * b.len())
    }

    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let mut y = self.weight.matmul_nt(x, rows, Par::Rayon)?;
        if let Some(b) = &self.bias {
            ops::add_bias_rows(&mut y, b)?;
        }
        Ok(y)
    }
}

/// Loads tensors by name with the shapes the config implies; matrices in `precision`.
pub(crate) struct WeightLoader<'a> {
    pub ckpt: &'a dyn TensorSource,
    pub cfg: &'a ModelConfig,
    pub precision: WeightPrecision,
}

impl WeightLoader<'_> {
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        Ok(self.ckpt.load(name, &[len])?.into_vec())
    }

    /// A `[out, inp]` matrix in the load's precision.
    pub fn matrix(&self, name: &str, out: usize, inp: usize) -> Result<Weights> {
        self.ckpt.load_weights(name, out, inp, self.precision)
    }

    /// Several `[out_i, in]` projections stacked into one `[Σ out_i, in]` linear (fused QKV,
    /// fused gate/up), with their biases stacked too when `bias`.
    pub fn fused_linear(
        &self,
        prefixes: &[(&str, usize)],
        inp: usize,
        bias: bool,
    ) -> Result<Linear> {
        self.fused_linear_in(prefixes, inp, bias, self.precision)
    }

    fn fused_linear_in(
        &self,
        prefixes: &[(&str, usize)],
        inp: usize,
        bias: bool,
        precision: WeightPrecision,
    ) -> Result<Linear> {
        let mut parts = Vec::with_capacity(prefixes.len());
        let mut b = Vec::new();
        for (prefix, out) in prefixes {
            parts.push(self.ckpt.load_weights(
                &format!("{prefix}.weight"),
                *out,
                inp,
                precision,
            )?);
            if bias {
                b.extend(self.vector(&format!("{prefix}.bias"), *out)?);
            }
        }
        let out_features = prefixes.iter().map(|p| p.1).sum();
        Ok(Linear {
            weight: Weights::concat_rows(parts)?,
            out_features,
            in_features: inp,
            bias: bias.then_some(b),
        })
    }

    pub fn linear(&self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        self.fused_linear(&[(prefix, out)], inp, bias)
    }

    /// A linear kept in f32 whatever the load's precision: routers and gates, which are small
    /// and whose outputs pick experts.
    pub fn linear_f32(&self, prefix: &str, out: usize, inp: usize) -> Result<Linear> {
        self.fused_linear_in(&[(prefix, out)], inp, false, WeightPrecision::F32)
    }

    /// A SwiGLU expert from three projections named `(gate, up, down)`.
    pub fn expert(&self, gate: &str, up: &str, down: &str, inter: usize) -> Result<ExpertWeights> {
        let h = self.cfg.hidden_size;
        let gu = self.fused_linear(&[(gate, inter), (up, inter)], h, false)?;
        Ok(ExpertWeights {
            hidden: h,
            intermediate: inter,
            gate_up: gu.weight,
            down: self.matrix(&format!("{down}.weight"), h, inter)?,
        })
    }
}

/// Queries, keys and values of a batch of tokens after norms and RoPE:
/// `q` is `[tokens, n_heads, head_dim]`, `k`/`v` are `[tokens, n_kv_heads, head_dim]`.
#[derive(Debug, Clone)]
pub struct Qkv {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// Rows of a batch that the row-wise parts of a layer (norms, projections, the MLP) process at a
/// time. Their temporaries (the fused q/k/v projection, the MoE's gathered rows and
/// intermediates: several times the hidden state per token) then stay bounded however long the
/// sequence is; only the hidden state, q/k/v and the K/V cache grow with it.
pub const PIECE_ROWS: usize = 4096;

/// How many pieces of at most `max_rows` rows `rows` rows take (at least one).
pub fn pieces_for(rows: usize, max_rows: usize) -> usize {
    rows.div_ceil(max_rows.max(1)).max(1)
}

/// Rows `start..end` of the `i`-th of `pieces` near-equal contiguous pieces of `rows` rows.
pub fn piece_range(rows: usize, pieces: usize, i: usize) -> (usize, usize) {
    let p = pieces.max(1);
    (i * rows / p, (i + 1) * rows / p)
}

/// Multi-head (grouped-query) self-attention.
#[derive(Debug, Clone)]
pub struct Attention {
    /// q, k and v projections fused row-wise.
    pub qkv: Linear,
    pub o: Linear,
    /// Qwen3-MoE's per-head RMSNorm weights for q and k (applied before RoPE).
    pub qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    pub params: AttentionParams,
    pub rope: RopeFreqs,
    pub eps: f32,
    /// Sliding window: a query at `p` sees only keys `p − w + 1 ..= p` (`None`: all earlier
    /// keys).
    pub window: Option<usize>,
}

impl Attention {
    /// The keys this layer's queries see on top of the causal mask: its window, if it has one.
    pub fn window_rule(&self) -> Option<AShape> {
        self.window.map(|local| AShape { sink: 0, local })
    }

    /// Drops from `kv` the keys this layer's window hides from every query at `next` or later
    /// (see [`LayerKv::trim_to_window`]); a full-attention layer keeps everything.
    pub fn trim_cache(&self, kv: &mut LayerKv, next: usize) {
        if let Some(w) = self.window {
            kv.trim_to_window(next, w);
        }
    }

    /// Attention of `q` (at `q_pos`) to the keys `k`/`v` (at `k_pos`) under this layer's rule:
    /// causal, within its window if it has one. Layouts as [`attention_block`].
    pub fn attend(
        &self,
        q: &[f32],
        q_pos: &[usize],
        k: &[f32],
        v: &[f32],
        k_pos: &[usize],
    ) -> Result<PartialAttention> {
        Ok(match self.window_rule() {
            None => attention_block(&self.params, q, q_pos, k, v, k_pos)?,
            Some(a) => {
                attention_sparse(&self.params, &Sparsity::AShape(a), q, q_pos, k, v, k_pos)?.0
            }
        })
    }

    /// Projects, normalises and rotates; `rope` holds the tokens' absolute positions.
    pub fn qkv(&self, x: &[f32], rope: &RopeTable) -> Result<Qkv> {
        let mut out = self.empty_qkv(rope.positions);
        self.project_into(x, rope.positions, &mut out)?;
        self.rotate(&mut out, rope)?;
        Ok(out)
    }

    /// A [`Qkv`] with room for `tokens` tokens.
    fn empty_qkv(&self, tokens: usize) -> Qkv {
        let (hq, hkv, d) = (
            self.params.n_heads,
            self.params.n_kv_heads,
            self.params.head_dim,
        );
        Qkv {
            q: Vec::with_capacity(tokens * hq * d),
            k: Vec::with_capacity(tokens * hkv * d),
            v: Vec::with_capacity(tokens * hkv * d),
        }
    }

    /// Projects `rows` rows of `x` and appends their q, k and v to `out` (before norms and RoPE).
    fn project_into(&self, x: &[f32], rows: usize, out: &mut Qkv) -> Result<()> {
        let (hq, hkv, d) = (
            self.params.n_heads,
            self.params.n_kv_heads,
            self.params.head_dim,
        );
        let fused = self.qkv.forward(x, rows)?;
        let width = (hq + 2 * hkv) * d;
        for row in fused.chunks(width) {
            out.q.extend_from_slice(&row[..hq * d]);
            out.k.extend_from_slice(&row[hq * d..(hq + hkv) * d]);
            out.v.extend_from_slice(&row[(hq + hkv) * d..]);
        }
        Ok(())
    }

    /// Qwen3's per-head q/k norms, then RoPE at `rope`'s positions, in place.
    fn rotate(&self, qkv: &mut Qkv, rope: &RopeTable) -> Result<()> {
        let (hq, hkv, d) = (
            self.params.n_heads,
            self.params.n_kv_heads,
            self.params.head_dim,
        );
        if let Some((qn, kn)) = &self.qk_norm {
            ops::rms_norm_chunks_inplace(&mut qkv.q, qn, self.eps)?;
            ops::rms_norm_chunks_inplace(&mut qkv.k, kn, self.eps)?;
        }
        apply_rope(&mut qkv.q, hq, d, rope)?;
        apply_rope(&mut qkv.k, hkv, d, rope)?;
        Ok(())
    }
}

/// Dense SwiGLU MLP (layers listed in `mlp_only_layers`, and Qwen2-MoE's shared expert).
#[derive(Debug, Clone)]
pub struct DenseMlp(pub ExpertWeights);

/// The sparse MoE block.
#[derive(Debug, Clone)]
pub struct SparseMoe {
    pub router: Linear,
    pub experts: ExpertSet,
    pub top_k: usize,
    pub norm: TopKNorm,
    /// Qwen2-MoE: `sigmoid(x·w_gate) · shared(x)` added to the routed output.
    pub shared: Option<(DenseMlp, Linear)>,
}

impl SparseMoe {
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<(Vec<f32>, Routing)> {
        self.forward_routed(x, rows, |x, routing| {
            moe::experts_local(x, self.router.in_features, routing, &self.experts)
        })
    }

    /// The block with the routed experts supplied by `experts`, which gets the normalised input
    /// (`[rows, hidden]`) and its routing and returns the gate-weighted sum of each token's expert
    /// outputs. Expert parallelism plugs in here; the router and the shared expert stay local.
    pub fn forward_routed<E: From<Error>>(
        &self,
        x: &[f32],
        rows: usize,
        experts: impl FnOnce(&[f32], &Routing) -> std::result::Result<Vec<f32>, E>,
    ) -> std::result::Result<(Vec<f32>, Routing), E> {
        let hidden = self.router.in_features;
        let logits = self.router.forward(x, rows)?;
        let routing = moe::route(&logits, self.experts.experts.len(), self.top_k, self.norm)?;
        let mut y = experts(x, &routing)?;
        if y.len() != rows * hidden {
            return Err(Error::InvalidInput(format!(
                "routed experts returned {} values for {rows} rows of hidden size {hidden}",
                y.len()
            ))
            .into());
        }
        if let Some((mlp, gate)) = &self.shared {
            let s = mlp.0.forward(x, rows)?;
            let g = gate.forward(x, rows)?;
            for ((yr, sr), &gv) in y.chunks_mut(hidden).zip(s.chunks(hidden)).zip(&g) {
                let gv = ops::sigmoid(gv);
                for (a, b) in yr.iter_mut().zip(sr) {
                    *a += gv * b;
                }
            }
        }
        Ok((y, routing))
    }
}

// One per layer, built once at load and never moved on a hot path: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Mlp {
    Dense(DenseMlp),
    Sparse(SparseMoe),
}

impl DecoderLayer {
    /// Bytes of weights this layer holds (only the experts loaded), in their precisions.
    pub fn weight_bytes(&self) -> usize {
        let a = &self.attn;
        let norms = a
            .qk_norm
            .as_ref()
            .map_or(0, |(q, k)| 4 * (q.len() + k.len()));
        let mlp = match &self.mlp {
            Mlp::Dense(m) => m.0.bytes(),
            Mlp::Sparse(m) => {
                m.router.bytes()
                    + m.experts
                        .experts
                        .iter()
                        .flatten()
                        .map(|e| e.bytes())
                        .sum::<usize>()
                    + m.shared
                        .as_ref()
                        .map_or(0, |(s, g)| s.0.bytes() + g.bytes())
            }
        };
        a.qkv.bytes()
            + a.o.bytes()
            + norms
            + 4 * (self.input_norm.len() + self.post_attn_norm.len())
            + mlp
    }
}

/// The routed experts of a sparse layer computed here, on the experts this process holds.
pub fn local_experts<E: From<Error>>(
    moe: &SparseMoe,
    x: &[f32],
    routing: &Routing,
) -> std::result::Result<Vec<f32>, E> {
    moe::experts_local(x, moe.router.in_features, routing, &moe.experts).map_err(E::from)
}

/// Pre-norm decoder layer: `h = x + attn(norm(x)); out = h + mlp(norm(h))`.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub input_norm: Vec<f32>,
    pub attn: Attention,
    pub post_attn_norm: Vec<f32>,
    pub mlp: Mlp,
    pub eps: f32,
}

impl DecoderLayer {
    /// Runs the layer on `x` (`[tokens, hidden]`) in place over a KV cache: the new tokens attend
    /// to the cached ones and to themselves. Returns the routing when the layer is sparse.
    pub fn forward(
        &self,
        x: &mut Tensor,
        positions: &[usize],
        rope: &RopeTable,
        cache: &mut LayerKv,
    ) -> Result<Option<Routing>> {
        let attn = &self.attn;
        self.forward_with(x, rope, |qkv| -> Result<Vec<f32>> {
            cache.append_owned(qkv.k, qkv.v, positions);
            Ok(attn
                .attend(&qkv.q, positions, &cache.k, &cache.v, &cache.positions)?
                .out)
        })
    }

    /// [`Self::forward`] finishing only the final row (the exact last-layer shortcut): every
    /// row's K/V is cached, but attention, the MLP and the residuals run for the last position
    /// alone, and `x` becomes that one row.
    pub fn forward_last(
        &self,
        x: &mut Tensor,
        positions: &[usize],
        rope: &RopeTable,
        cache: &mut LayerKv,
    ) -> Result<Option<Routing>> {
        let Qkv { q, k, v } = self.qkv(x, rope)?;
        cache.append_owned(k, v, positions);
        let t = positions.len();
        let w = self.attn.params.n_heads * self.attn.params.head_dim;
        if t == 0 || q.len() != t * w {
            return Err(Error::InvalidInput(format!(
                "{} query values for {t} positions",
                q.len()
            )));
        }
        let q = q[(t - 1) * w..].to_vec();
        let out = self.attn.attend(
            &q,
            &positions[t - 1..],
            &cache.k,
            &cache.v,
            &cache.positions,
        )?;
        *x = x.rows(t - 1, t)?;
        self.finish(x, &out.out, local_experts)
    }

    /// The layer with its attention core supplied by `attend`, which receives this batch's rotated
    /// q/k/v and returns the attention output `[tokens, n_heads · head_dim]` before the output
    /// projection. Ring attention plugs in here; everything else is the single-process layer.
    pub fn forward_with<E: From<Error>>(
        &self,
        x: &mut Tensor,
        rope: &RopeTable,
        attend: impl FnOnce(Qkv) -> std::result::Result<Vec<f32>, E>,
    ) -> std::result::Result<Option<Routing>, E> {
        self.forward_parts(x, rope, attend, local_experts)
    }

    /// [`Self::forward_with`] with the routed experts of a sparse layer supplied as well (see
    /// [`SparseMoe::forward_routed`]); `experts` is not called for a dense-MLP layer.
    pub fn forward_parts<E: From<Error>>(
        &self,
        x: &mut Tensor,
        rope: &RopeTable,
        attend: impl FnOnce(Qkv) -> std::result::Result<Vec<f32>, E>,
        experts: impl FnMut(&SparseMoe, &[f32], &Routing) -> std::result::Result<Vec<f32>, E>,
    ) -> std::result::Result<Option<Routing>, E> {
        let qkv = self.qkv(x, rope)?;
        let out = attend(qkv)?;
        self.finish(x, &out, experts)
    }

    /// The attention half's input: the rotated q/k/v of `x`'s rows (`[tokens, hidden]`, one
    /// RoPE position per row), normalised and projected [`PIECE_ROWS`] rows at a time.
    pub fn qkv(&self, x: &Tensor, rope: &RopeTable) -> Result<Qkv> {
        let rows = x.shape().first().copied().unwrap_or(0);
        if rope.positions != rows {
            return Err(Error::InvalidInput(format!(
                "{rows} hidden rows but {} RoPE positions",
                rope.positions
            )));
        }
        let mut out = self.attn.empty_qkv(rows);
        let pieces = pieces_for(rows, PIECE_ROWS);
        for i in 0..pieces {
            let (s, e) = piece_range(rows, pieces, i);
            let normed = if pieces == 1 {
                ops::rms_norm(x, &self.input_norm, self.eps)?
            } else {
                ops::rms_norm(&x.rows(s, e)?, &self.input_norm, self.eps)?
            };
            self.attn.project_into(normed.as_slice(), e - s, &mut out)?;
        }
        self.attn.rotate(&mut out, rope)?;
        Ok(out)
    }

    /// [`Self::finish_in`] in as many pieces as [`PIECE_ROWS`] asks for `x`'s rows.
    pub fn finish<E: From<Error>>(
        &self,
        x: &mut Tensor,
        out: &[f32],
        experts: impl FnMut(&SparseMoe, &[f32], &Routing) -> std::result::Result<Vec<f32>, E>,
    ) -> std::result::Result<Option<Routing>, E> {
        let rows = x.shape().first().copied().unwrap_or(0);
        self.finish_in(x, out, pieces_for(rows, PIECE_ROWS), experts)
    }

    /// The rest of the layer (see [`Self::finish_piece`]) over `pieces` contiguous near-equal
    /// pieces of `x`'s rows, one after the other: `experts` is called once per piece, even for
    /// an empty one, so ranks that agree on `pieces` make the same number of expert-parallel
    /// exchanges. Every step is row-wise, so the pieces change no result beyond the GEMMs'
    /// summation order. Returns the routing of all rows (a sparse layer).
    pub fn finish_in<E: From<Error>>(
        &self,
        x: &mut Tensor,
        out: &[f32],
        pieces: usize,
        mut experts: impl FnMut(&SparseMoe, &[f32], &Routing) -> std::result::Result<Vec<f32>, E>,
    ) -> std::result::Result<Option<Routing>, E> {
        if pieces <= 1 {
            return self.finish_piece(x, out, &mut experts);
        }
        let (rows, h) = x.dims2("finish").map_err(Error::from)?;
        let width = self.attention_width(rows, out)?;
        let mut routing: Option<Routing> = None;
        for i in 0..pieces {
            let (s, e) = piece_range(rows, pieces, i);
            let mut part = x.rows(s, e).map_err(Error::from)?;
            let r = self.finish_piece(&mut part, &out[s * width..e * width], &mut experts)?;
            x.as_mut_slice()[s * h..e * h].copy_from_slice(part.as_slice());
            match (&mut routing, r) {
                (Some(all), Some(r)) => {
                    all.expert_ids.extend(r.expert_ids);
                    all.weights.extend(r.weights);
                }
                (all @ None, r) => *all = r,
                (Some(_), None) => {}
            }
        }
        Ok(routing)
    }

    /// The width of one row of attention output, checking that `out` holds `rows` of them.
    fn attention_width(&self, rows: usize, out: &[f32]) -> Result<usize> {
        let width = self.attn.params.n_heads * self.attn.params.head_dim;
        if out.len() != rows * width {
            return Err(Error::InvalidInput(format!(
                "attention output of {} values for {rows} rows of {width}",
                out.len()
            )));
        }
        Ok(width)
    }

    /// The rest of the layer on `x`'s rows given their attention output `out`
    /// (`[rows, n_heads · head_dim]`): output projection and residual, then the MLP half (the
    /// routed experts of a sparse layer from `experts`, as in [`Self::forward_parts`]). `x` may
    /// be fewer rows than [`Self::qkv`] saw: the exact last-layer shortcut finishes only the
    /// final position.
    fn finish_piece<E: From<Error>>(
        &self,
        x: &mut Tensor,
        out: &[f32],
        experts: &mut impl FnMut(&SparseMoe, &[f32], &Routing) -> std::result::Result<Vec<f32>, E>,
    ) -> std::result::Result<Option<Routing>, E> {
        let rows = x.shape().first().copied().unwrap_or(0);
        self.attention_width(rows, out)?;
        // Output projection and residual, then the MLP half of the layer.
        let attn = self.attn.o.forward(out, rows)?;
        ops::add_inplace(
            x,
            &Tensor::from_vec(attn, x.shape().to_vec()).map_err(Error::from)?,
        )
        .map_err(Error::from)?;
        let normed = ops::rms_norm(x, &self.post_attn_norm, self.eps).map_err(Error::from)?;
        let (y, routing) = match &self.mlp {
            Mlp::Dense(m) => (m.0.forward(normed.as_slice(), rows)?, None),
            Mlp::Sparse(m) => {
                let (y, r) =
                    m.forward_routed(normed.as_slice(), rows, |x, routing| experts(m, x, routing))?;
                (y, Some(r))
            }
        };
        ops::add_inplace(
            x,
            &Tensor::from_vec(y, x.shape().to_vec()).map_err(Error::from)?,
        )
        .map_err(Error::from)?;
        Ok(routing)
    }
}
