//! The building blocks the architecture files assemble: linear layers, attention with a KV cache,
//! the dense SwiGLU MLP, the sparse MoE block (with Qwen2-MoE's optional shared expert) and the
//! pre-norm decoder layer — written once over a [`Backend`]: the host loads every layer as
//! `DecoderLayer<Cpu>` ([`Cpu`] is the default backend), [`DecoderLayer::into_backend`] moves it to
//! another (the CUDA backend uploads it), and the forward pass is the same code on both.

use ringmoe_core::attention::AttentionParams;
use ringmoe_core::rope::RopeFreqs;
use ringmoe_core::sparse::{AShape, Sparsity};
use ringmoe_core::{Backend, Cpu, Partial, Stored, Tensor, WeightPrecision, Weights};

use crate::checkpoint::TensorSource;
use crate::config::ModelConfig;
use crate::moe::{self, ExpertSet, ExpertWeights, Routing, TopKNorm};
use crate::{Error, Result};

/// `y = x Wᵀ (+ b)` with HF's `[out, in]` weight layout.
#[derive(Debug, Clone)]
pub struct Linear<B: Backend = Cpu> {
    /// `[out_features, in_features]` in the load's weight precision (routers: always f32).
    pub weight: B::Weight,
    pub out_features: usize,
    pub in_features: usize,
    pub bias: Option<B::Vector>,
}

impl<B: Backend> Linear<B> {
    /// Bytes held: the matrix in its precision, the bias in f32.
    pub fn bytes(&self) -> usize {
        self.weight.bytes() + self.bias.as_ref().map_or(0, Stored::bytes)
    }

    pub fn forward(&self, b: &B, x: &B::Act) -> ringmoe_core::Result<B::Act> {
        b.linear(x, &self.weight, self.bias.as_ref())
    }
}

impl Linear<Cpu> {
    /// The same layer on backend `b`; `exact` keeps the matrix in f32 there.
    pub fn into_backend<B: Backend>(
        self,
        b: &B,
        precision: WeightPrecision,
        exact: bool,
    ) -> ringmoe_core::Result<Linear<B>> {
        Ok(Linear {
            weight: b.weight(self.weight, precision, exact)?,
            out_features: self.out_features,
            in_features: self.in_features,
            bias: self.bias.map(|v| b.vector(v)).transpose()?,
        })
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
/// `q` is `[tokens, n_heads · head_dim]`, `k`/`v` are `[tokens, n_kv_heads · head_dim]`.
#[derive(Debug)]
pub struct Qkv<A = Tensor> {
    pub q: A,
    pub k: A,
    pub v: A,
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
pub struct Attention<B: Backend = Cpu> {
    /// q, k and v projections fused row-wise.
    pub qkv: Linear<B>,
    pub o: Linear<B>,
    /// Qwen3-MoE's per-head RMSNorm weights for q and k (applied before RoPE).
    pub qk_norm: Option<(B::Vector, B::Vector)>,
    pub params: AttentionParams,
    pub rope: RopeFreqs,
    pub eps: f32,
    /// Sliding window: a query at `p` sees only keys `p − w + 1 ..= p` (`None`: all earlier
    /// keys).
    pub window: Option<usize>,
}

impl<B: Backend> Attention<B> {
    /// The keys this layer's queries see on top of the causal mask: its window, if it has one.
    pub fn window_rule(&self) -> Option<AShape> {
        self.window.map(|local| AShape { sink: 0, local })
    }

    /// [`Self::window_rule`] as an attention mask.
    pub fn mask(&self) -> Sparsity<'static> {
        match self.window_rule() {
            Some(a) => Sparsity::AShape(a),
            None => Sparsity::Dense,
        }
    }

    /// Drops from `kv` the keys this layer's window hides from every query at `next` or later
    /// (see [`ringmoe_core::kv::LayerKv::trim_to_window`]); a full-attention layer keeps
    /// everything.
    pub fn trim_cache(&self, b: &B, kv: &mut B::Kv, next: usize) -> ringmoe_core::Result<()> {
        match self.window {
            Some(w) => b.kv_trim(kv, next, w),
            None => Ok(()),
        }
    }

    /// Attention of `q` (at `q_pos`) to everything in `kv` under this layer's rule: causal,
    /// within its window if it has one.
    pub fn attend(
        &self,
        b: &B,
        q: &B::Act,
        q_pos: &[usize],
        kv: &B::Kv,
    ) -> ringmoe_core::Result<Partial<B::Act>> {
        b.attend_cached(&self.params, &self.mask(), q, q_pos, kv)
    }

    /// Projects `rows` normalised rows into q, k and v (before norms and RoPE).
    fn project(&self, b: &B, x: &B::Act) -> ringmoe_core::Result<Qkv<B::Act>> {
        let (hq, hkv, d) = (
            self.params.n_heads,
            self.params.n_kv_heads,
            self.params.head_dim,
        );
        let fused = self.qkv.forward(b, x)?;
        let (q, k, v) = b.split_qkv(&fused, hq * d, hkv * d)?;
        Ok(Qkv { q, k, v })
    }

    /// Qwen3's per-head q/k norms, then RoPE at `rope`'s positions, in place.
    fn rotate(&self, b: &B, qkv: &mut Qkv<B::Act>, rope: &B::Rope) -> ringmoe_core::Result<()> {
        let (hq, hkv, d) = (
            self.params.n_heads,
            self.params.n_kv_heads,
            self.params.head_dim,
        );
        if let Some((qn, kn)) = &self.qk_norm {
            b.rms_norm_chunks(&mut qkv.q, qn, self.eps)?;
            b.rms_norm_chunks(&mut qkv.k, kn, self.eps)?;
        }
        b.rope(&mut qkv.q, hq, d, rope)?;
        b.rope(&mut qkv.k, hkv, d, rope)?;
        Ok(())
    }
}

impl Attention<Cpu> {
    fn into_backend<B: Backend>(
        self,
        b: &B,
        precision: WeightPrecision,
    ) -> ringmoe_core::Result<Attention<B>> {
        Ok(Attention {
            qkv: self.qkv.into_backend(b, precision, false)?,
            o: self.o.into_backend(b, precision, false)?,
            qk_norm: match self.qk_norm {
                Some((q, k)) => Some((b.vector(q)?, b.vector(k)?)),
                None => None,
            },
            params: self.params,
            rope: self.rope,
            eps: self.eps,
            window: self.window,
        })
    }
}

/// Dense SwiGLU MLP (layers listed in `mlp_only_layers`, and Qwen2-MoE's shared expert).
#[derive(Debug, Clone)]
pub struct DenseMlp<B: Backend = Cpu>(pub ExpertWeights<B>);

impl<B: Backend> DenseMlp<B> {
    pub fn forward(&self, b: &B, x: &B::Act) -> ringmoe_core::Result<B::Act> {
        self.0.forward_on(b, x)
    }
}

/// The sparse MoE block.
#[derive(Debug, Clone)]
pub struct SparseMoe<B: Backend = Cpu> {
    pub router: Linear<B>,
    pub experts: ExpertSet<B>,
    pub top_k: usize,
    pub norm: TopKNorm,
    /// Qwen2-MoE: `sigmoid(x·w_gate) · shared(x)` added to the routed output.
    pub shared: Option<(DenseMlp<B>, Linear<B>)>,
}

impl<B: Backend> SparseMoe<B> {
    /// The block with every routed expert on this process.
    pub fn forward(&self, b: &B, x: &B::Act) -> Result<(B::Act, Routing)> {
        self.forward_routed(b, x, |x, routing| {
            local_experts::<B, Error>(b, self, x, routing)
        })
    }

    /// The block with the routed experts supplied by `experts`, which gets the normalised input
    /// (`[rows, hidden]`) and its routing and returns the gate-weighted sum of each token's expert
    /// outputs. Expert parallelism plugs in here; the router and the shared expert stay local.
    /// The router's logits come to the host, where the top-k is taken.
    pub fn forward_routed<E: From<Error>>(
        &self,
        b: &B,
        x: &B::Act,
        experts: impl FnOnce(&B::Act, &Routing) -> std::result::Result<B::Act, E>,
    ) -> std::result::Result<(B::Act, Routing), E> {
        let hidden = self.router.in_features;
        let (rows, _) = b.dims(x).map_err(Error::from)?;
        let logits = b
            .download_owned(self.router.forward(b, x).map_err(Error::from)?)
            .map_err(Error::from)?;
        let routing = moe::route(
            logits.as_slice(),
            self.experts.experts.len(),
            self.top_k,
            self.norm,
        )?;
        let mut y = experts(x, &routing)?;
        let got = b.dims(&y).map_err(Error::from)?;
        if got != (rows, hidden) {
            return Err(Error::InvalidInput(format!(
                "routed experts returned {got:?} for {rows} rows of hidden size {hidden}"
            ))
            .into());
        }
        if let Some((mlp, gate)) = &self.shared {
            let s = mlp.forward(b, x).map_err(Error::from)?;
            let g = gate.forward(b, x).map_err(Error::from)?;
            b.add_gated(&mut y, &s, &g).map_err(Error::from)?;
        }
        Ok((y, routing))
    }
}

// One per layer, built once at load and never moved on a hot path: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Mlp<B: Backend = Cpu> {
    Dense(DenseMlp<B>),
    Sparse(SparseMoe<B>),
}

impl<B: Backend> DecoderLayer<B> {
    /// Bytes of weights this layer holds (only the experts loaded), in their precisions.
    pub fn weight_bytes(&self) -> usize {
        let a = &self.attn;
        let norms = a.qk_norm.as_ref().map_or(0, |(q, k)| q.bytes() + k.bytes());
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
            + self.input_norm.bytes()
            + self.post_attn_norm.bytes()
            + mlp
    }
}

/// The routed experts of a sparse layer computed here, on the experts this process holds:
/// plan → gather → grouped expert MLPs → combine in increasing expert id.
pub fn local_experts<B: Backend, E: From<Error>>(
    b: &B,
    m: &SparseMoe<B>,
    x: &B::Act,
    routing: &Routing,
) -> std::result::Result<B::Act, E> {
    moe::experts_on(b, x, routing, &m.experts).map_err(E::from)
}

/// Pre-norm decoder layer: `h = x + attn(norm(x)); out = h + mlp(norm(h))`.
#[derive(Debug, Clone)]
pub struct DecoderLayer<B: Backend = Cpu> {
    pub input_norm: B::Vector,
    pub attn: Attention<B>,
    pub post_attn_norm: B::Vector,
    pub mlp: Mlp<B>,
    pub eps: f32,
}

impl DecoderLayer<Cpu> {
    /// The same layer on backend `b` (uploaded there), matrices in `precision` except the
    /// routers and gates, which stay f32.
    pub fn into_backend<B: Backend>(
        self,
        b: &B,
        precision: WeightPrecision,
    ) -> ringmoe_core::Result<DecoderLayer<B>> {
        let mlp = match self.mlp {
            Mlp::Dense(m) => Mlp::Dense(DenseMlp(m.0.into_backend(b, precision)?)),
            Mlp::Sparse(m) => Mlp::Sparse(SparseMoe {
                router: m.router.into_backend(b, precision, true)?,
                experts: m.experts.into_backend(b, precision)?,
                top_k: m.top_k,
                norm: m.norm,
                shared: match m.shared {
                    Some((s, g)) => Some((
                        DenseMlp(s.0.into_backend(b, precision)?),
                        g.into_backend(b, precision, true)?,
                    )),
                    None => None,
                },
            }),
        };
        Ok(DecoderLayer {
            input_norm: b.vector(self.input_norm)?,
            attn: self.attn.into_backend(b, precision)?,
            post_attn_norm: b.vector(self.post_attn_norm)?,
            mlp,
            eps: self.eps,
        })
    }
}

/// What a layer's routed experts are, for [`DecoderLayer::forward_parts`]: given the sparse block,
/// the normalised rows of one piece and their routing, the gate-weighted expert output.
pub type Experts<'a, B, E> = dyn FnMut(
        &SparseMoe<B>,
        &<B as Backend>::Act,
        &Routing,
    ) -> std::result::Result<<B as Backend>::Act, E>
    + 'a;

impl<B: Backend> DecoderLayer<B> {
    /// Runs the layer on `x` (`[tokens, hidden]`) in place over a KV cache: the new tokens attend
    /// to the cached ones and to themselves. Returns the routing when the layer is sparse.
    pub fn forward(
        &self,
        b: &B,
        x: &mut B::Act,
        positions: &[usize],
        rope: &B::Rope,
        cache: &mut B::Kv,
    ) -> Result<Option<Routing>> {
        let attn = &self.attn;
        self.forward_with(b, x, rope, |qkv| -> Result<B::Act> {
            b.kv_append(cache, qkv.k, qkv.v, positions)?;
            Ok(attn.attend(b, &qkv.q, positions, cache)?.out)
        })
    }

    /// [`Self::forward`] finishing only the final row (the exact last-layer shortcut): every
    /// row's K/V is cached, but attention, the MLP and the residuals run for the last position
    /// alone, and `x` becomes that one row.
    pub fn forward_last(
        &self,
        b: &B,
        x: &mut B::Act,
        positions: &[usize],
        rope: &B::Rope,
        cache: &mut B::Kv,
    ) -> Result<Option<Routing>> {
        let Qkv { q, k, v } = self.qkv(b, x, rope)?;
        b.kv_append(cache, k, v, positions)?;
        let t = positions.len();
        if t == 0 || b.dims(&q)?.0 != t {
            return Err(Error::InvalidInput(format!(
                "{:?} queries for {t} positions",
                b.dims(&q)?
            )));
        }
        let q = b.rows(&q, t - 1, t)?;
        let out = self.attn.attend(b, &q, &positions[t - 1..], cache)?;
        *x = b.rows(x, t - 1, t)?;
        self.finish(b, x, &out.out, &mut |m, x, r| {
            local_experts::<B, Error>(b, m, x, r)
        })
    }

    /// The layer with its attention core supplied by `attend`, which receives this batch's rotated
    /// q/k/v and returns the attention output `[tokens, n_heads · head_dim]` before the output
    /// projection. Ring attention plugs in here; everything else is the single-process layer.
    pub fn forward_with<E: From<Error>>(
        &self,
        b: &B,
        x: &mut B::Act,
        rope: &B::Rope,
        attend: impl FnOnce(Qkv<B::Act>) -> std::result::Result<B::Act, E>,
    ) -> std::result::Result<Option<Routing>, E> {
        self.forward_parts(b, x, rope, attend, &mut |m, x, r| {
            local_experts::<B, E>(b, m, x, r)
        })
    }

    /// [`Self::forward_with`] with the routed experts of a sparse layer supplied as well (see
    /// [`SparseMoe::forward_routed`]); `experts` is not called for a dense-MLP layer.
    pub fn forward_parts<E: From<Error>>(
        &self,
        b: &B,
        x: &mut B::Act,
        rope: &B::Rope,
        attend: impl FnOnce(Qkv<B::Act>) -> std::result::Result<B::Act, E>,
        experts: &mut Experts<'_, B, E>,
    ) -> std::result::Result<Option<Routing>, E> {
        let qkv = self.qkv(b, x, rope)?;
        let out = attend(qkv)?;
        self.finish(b, x, &out, experts)
    }

    /// The attention half's input: the rotated q/k/v of `x`'s rows (`[tokens, hidden]`, one
    /// RoPE position per row), normalised and projected [`PIECE_ROWS`] rows at a time.
    pub fn qkv(&self, b: &B, x: &B::Act, rope: &B::Rope) -> Result<Qkv<B::Act>> {
        let rows = b.dims(x)?.0;
        let pieces = pieces_for(rows, PIECE_ROWS);
        let mut out = if pieces == 1 {
            self.attn
                .project(b, &b.rms_norm(x, &self.input_norm, self.eps)?)?
        } else {
            // Each piece's q/k/v goes straight into the whole batch's, so only one piece's
            // projection exists beside them.
            let p = &self.attn.params;
            let (qw, kw) = (p.n_heads * p.head_dim, p.n_kv_heads * p.head_dim);
            let mut all = Qkv {
                q: b.zeros(rows, qw)?,
                k: b.zeros(rows, kw)?,
                v: b.zeros(rows, kw)?,
            };
            for i in 0..pieces {
                let (s, e) = piece_range(rows, pieces, i);
                let normed = b.rms_norm(&b.rows(x, s, e)?, &self.input_norm, self.eps)?;
                let part = self.attn.project(b, &normed)?;
                b.set_rows(&mut all.q, s, &part.q)?;
                b.set_rows(&mut all.k, s, &part.k)?;
                b.set_rows(&mut all.v, s, &part.v)?;
            }
            all
        };
        self.attn.rotate(b, &mut out, rope)?;
        Ok(out)
    }

    /// [`Self::finish_in`] in as many pieces as [`PIECE_ROWS`] asks for `x`'s rows.
    pub fn finish<E: From<Error>>(
        &self,
        b: &B,
        x: &mut B::Act,
        out: &B::Act,
        experts: &mut Experts<'_, B, E>,
    ) -> std::result::Result<Option<Routing>, E> {
        let rows = b.dims(x).map_err(Error::from)?.0;
        self.finish_in(b, x, out, pieces_for(rows, PIECE_ROWS), experts)
    }

    /// The rest of the layer (see [`Self::finish_piece`]) over `pieces` contiguous near-equal
    /// pieces of `x`'s rows, one after the other: `experts` is called once per piece, even for
    /// an empty one, so ranks that agree on `pieces` make the same number of expert-parallel
    /// exchanges. Every step is row-wise, so the pieces change no result beyond the GEMMs'
    /// summation order. Returns the routing of all rows (a sparse layer).
    pub fn finish_in<E: From<Error>>(
        &self,
        b: &B,
        x: &mut B::Act,
        out: &B::Act,
        pieces: usize,
        experts: &mut Experts<'_, B, E>,
    ) -> std::result::Result<Option<Routing>, E> {
        if pieces <= 1 {
            return self.finish_piece(b, x, out, experts);
        }
        let rows = b.dims(x).map_err(Error::from)?.0;
        self.attention_width(b, rows, out)?;
        let mut routing: Option<Routing> = None;
        for i in 0..pieces {
            let (s, e) = piece_range(rows, pieces, i);
            let mut part = b.rows(x, s, e).map_err(Error::from)?;
            let piece_out = b.rows(out, s, e).map_err(Error::from)?;
            let r = self.finish_piece(b, &mut part, &piece_out, experts)?;
            b.set_rows(x, s, &part).map_err(Error::from)?;
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

    /// Checks that `out` holds `rows` rows of attention output.
    fn attention_width(&self, b: &B, rows: usize, out: &B::Act) -> Result<()> {
        let width = self.attn.params.n_heads * self.attn.params.head_dim;
        let got = b.dims(out)?;
        if got != (rows, width) {
            return Err(Error::InvalidInput(format!(
                "attention output of {got:?} for {rows} rows of {width}"
            )));
        }
        Ok(())
    }

    /// The rest of the layer on `x`'s rows given their attention output `out`
    /// (`[rows, n_heads · head_dim]`): output projection and residual, then the MLP half (the
    /// routed experts of a sparse layer from `experts`, as in [`Self::forward_parts`]). `x` may
    /// be fewer rows than [`Self::qkv`] saw: the exact last-layer shortcut finishes only the
    /// final position.
    fn finish_piece<E: From<Error>>(
        &self,
        b: &B,
        x: &mut B::Act,
        out: &B::Act,
        experts: &mut Experts<'_, B, E>,
    ) -> std::result::Result<Option<Routing>, E> {
        let rows = b.dims(x).map_err(Error::from)?.0;
        self.attention_width(b, rows, out)?;
        let go = |e: ringmoe_core::Error| E::from(Error::from(e));
        // Output projection and residual, then the MLP half of the layer.
        let attn = self.attn.o.forward(b, out).map_err(go)?;
        b.add_inplace(x, &attn).map_err(go)?;
        drop(attn);
        let normed = b.rms_norm(x, &self.post_attn_norm, self.eps).map_err(go)?;
        let (y, routing) = match &self.mlp {
            Mlp::Dense(m) => (m.forward(b, &normed).map_err(go)?, None),
            Mlp::Sparse(m) => {
                let (y, r) = m.forward_routed(b, &normed, |x, routing| experts(m, x, routing))?;
                (y, Some(r))
            }
        };
        b.add_inplace(x, &y).map_err(go)?;
        Ok(routing)
    }
}
