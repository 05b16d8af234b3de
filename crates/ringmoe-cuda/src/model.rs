//! The model's forward pass on one GPU: the layers of a Hugging Face checkpoint uploaded once
//! (large matrices in the chosen [`Precision`], norms, biases and the router in f32), hidden
//! states and the K/V cache in device memory, every operation a cuBLAS GEMM or a kernel of
//! `kernels.cu`. The host only routes: router top-k comes back (the grouped GEMM needs each
//! expert's row count on the host anyway), `ringmoe_model::moe::plan` groups the slots, and the
//! permutation goes back up for the gather and the combine.
//!
//! It mirrors `ringmoe_model::Model` step by step, which is the reference `gpu-check` compares it
//! with; the weights come from the same loader ([`ringmoe_model::load_parts`]), one layer at a
//! time, holding only the experts an [`ExpertSelection`] names (a worker's placement).

use std::path::Path;
use std::sync::Arc;

use ringmoe_core::attention::AttentionParams;
use ringmoe_core::rope::RopeFreqs;
use ringmoe_core::{WeightPrecision, Weights};
use ringmoe_model::layers::{DecoderLayer, Linear, Mlp};
use ringmoe_model::moe::{self, ExpertWeights, Routing, TopKNorm};
use ringmoe_model::{
    Checkpoint, ExpertSelection, ForwardOutput, LogitsFor, ModelConfig, TensorSource, load_parts,
    nll_of,
};

use ringmoe_comm::nccl::NcclCommunicator;
use ringmoe_comm::{Kind, Tag};
use ringmoe_parallel::{
    AttentionMode, ExpertParallel, MoeStats, ShardPlan, moe_parallel_on, ring_attention_on,
};

use crate::device::{CudaBackend, DeviceKv, DeviceRope, DeviceTensor, DeviceWeight};
use crate::{CudaError, Precision, Result};

/// Final hidden states, each sparse layer's routing, the expert-parallel figures.
pub(crate) type LayersOut = (DeviceTensor, Vec<(usize, Routing)>, MoeStats);

/// How one layer's attention core runs.
pub(crate) enum Attend<'a> {
    /// One GPU: append the new K/V to the cache and attend to everything cached.
    Cached,
    /// Context-parallel prefill: append this rank's K/V, then ring attention over the group
    /// (`ringmoe_parallel::ring_attention_on`), the sequence sharded by the plan.
    Ring(&'a ShardPlan),
    /// A decode step over a sharded cache: the new K/V is appended here when `own`; each rank's
    /// partial `(out, lse)` over its own cache is all-gathered and merged in rank order.
    Sharded { own: bool },
}

/// The NCCL group a distributed forward runs over, and whether its routed experts are
/// expert-parallel (else every rank holds every expert).
pub(crate) struct Group<'a> {
    pub comm: &'a NcclCommunicator,
    pub ep: Option<&'a ExpertParallel>,
}

fn invalid(op: &'static str, msg: String) -> CudaError {
    CudaError::Invalid { op, msg }
}

struct DevLinear {
    w: DeviceWeight,
    bias: Option<DeviceTensor>,
}

/// A SwiGLU MLP: fused `[gate; up]` `[2·inter, hidden]` and `down` `[hidden, inter]`.
struct DevMlp {
    gate_up: DeviceWeight,
    down: DeviceWeight,
}

struct DevMoe {
    router: DevLinear,
    experts: Vec<Option<DevMlp>>,
    top_k: usize,
    norm: TopKNorm,
    shared: Option<(DevMlp, DevLinear)>,
}

enum DevFfn {
    Dense(DevMlp),
    Sparse(Box<DevMoe>),
}

struct DevAttention {
    qkv: DevLinear,
    o: DevLinear,
    qk_norm: Option<(DeviceTensor, DeviceTensor)>,
    params: AttentionParams,
}

struct DevLayer {
    input_norm: DeviceTensor,
    attn: DevAttention,
    post_norm: DeviceTensor,
    ffn: DevFfn,
    eps: f32,
}

/// The K/V cache of a [`CudaModel`]: one [`DeviceKv`] per layer.
#[derive(Debug)]
pub struct CudaKvCache {
    layers: Vec<DeviceKv>,
}

impl CudaKvCache {
    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, DeviceKv::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Device bytes held (capacity).
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(DeviceKv::bytes).sum()
    }
}

/// A checkpoint's decoder on one GPU.
pub struct CudaModel {
    b: Arc<CudaBackend>,
    pub config: ModelConfig,
    precision: Precision,
    embed: DeviceWeight,
    layers: Vec<DevLayer>,
    norm: DeviceTensor,
    lm_head: DeviceWeight,
    rope: RopeFreqs,
    weight_bytes: usize,
}

impl std::fmt::Debug for CudaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaModel")
            .field("device", &self.b.describe())
            .field("precision", &self.precision)
            .field("weight_bytes", &self.weight_bytes)
            .finish_non_exhaustive()
    }
}

/// Uploads host layers as they are read, counting device bytes.
struct Uploader<'a> {
    b: &'a CudaBackend,
    precision: Precision,
    bytes: usize,
}

impl Uploader<'_> {
    fn vec(&mut self, v: &[f32]) -> Result<DeviceTensor> {
        self.bytes += 4 * v.len();
        self.b.upload_vec(v)
    }

    /// Uploads a host matrix (held in whatever precision the host load chose; decoded to f32
    /// here, then converted to the device precision `p`).
    fn matrix(
        &mut self,
        w: &Weights,
        rows: usize,
        cols: usize,
        p: Precision,
    ) -> Result<DeviceWeight> {
        let d = self.b.upload_weight(&w.to_f32(), rows, cols, p)?;
        self.bytes += d.bytes();
        Ok(d)
    }

    fn linear(&mut self, l: &Linear, p: Precision) -> Result<DevLinear> {
        Ok(DevLinear {
            w: self.matrix(&l.weight, l.out_features, l.in_features, p)?,
            bias: l.bias.as_deref().map(|b| self.vec(b)).transpose()?,
        })
    }

    fn mlp(&mut self, e: &ExpertWeights) -> Result<DevMlp> {
        let p = self.precision;
        Ok(DevMlp {
            gate_up: self.matrix(&e.gate_up, 2 * e.intermediate, e.hidden, p)?,
            down: self.matrix(&e.down, e.hidden, e.intermediate, p)?,
        })
    }

    fn layer(&mut self, l: &DecoderLayer) -> Result<DevLayer> {
        let p = self.precision;
        let a = &l.attn;
        let attn = DevAttention {
            qkv: self.linear(&a.qkv, p)?,
            o: self.linear(&a.o, p)?,
            qk_norm: match &a.qk_norm {
                Some((q, k)) => Some((self.vec(q)?, self.vec(k)?)),
                None => None,
            },
            params: a.params,
        };
        let ffn = match &l.mlp {
            Mlp::Dense(m) => DevFfn::Dense(self.mlp(&m.0)?),
            Mlp::Sparse(m) => DevFfn::Sparse(Box::new(DevMoe {
                // The router stays f32 in every precision: a bf16 router flips near-tied
                // top-k choices, which no logits tolerance absorbs.
                router: self.linear(&m.router, Precision::F32)?,
                experts: m
                    .experts
                    .experts
                    .iter()
                    .map(|e| e.as_ref().map(|e| self.mlp(e)).transpose())
                    .collect::<Result<_>>()?,
                top_k: m.top_k,
                norm: m.norm,
                shared: match &m.shared {
                    Some((mlp, gate)) => {
                        Some((self.mlp(&mlp.0)?, self.linear(gate, Precision::F32)?))
                    }
                    None => None,
                },
            })),
        };
        Ok(DevLayer {
            input_norm: self.vec(&l.input_norm)?,
            attn,
            post_norm: self.vec(&l.post_attn_norm)?,
            ffn,
            eps: l.eps,
        })
    }
}

impl CudaModel {
    /// Loads `DIR/config.json` and the weights `experts` selects from `DIR`'s safetensors onto
    /// the backend's GPU.
    pub fn load(
        b: Arc<CudaBackend>,
        dir: &Path,
        experts: &ExpertSelection,
        precision: Precision,
    ) -> Result<Self> {
        let cfg = ModelConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        Self::from_source(b, cfg, &ckpt, experts, precision)
    }

    /// Builds the model from any tensor source (a checkpoint, or random weights for benches),
    /// one layer on the host at a time.
    pub fn from_source(
        b: Arc<CudaBackend>,
        cfg: ModelConfig,
        src: &dyn TensorSource,
        experts: &ExpertSelection,
        precision: Precision,
    ) -> Result<Self> {
        let mut up = Uploader {
            b: &b,
            precision,
            bytes: 0,
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        let mut rope = None;
        // The host holds each layer as the checkpoint stores it (bf16 stays bf16) until upload.
        let g = load_parts(
            &cfg,
            src,
            experts,
            WeightPrecision::Native,
            |_, layer| -> Result<()> {
                rope.get_or_insert_with(|| layer.attn.rope.clone());
                layers.push(up.layer(&layer)?);
                Ok(())
            },
        )?;
        let rope = rope.ok_or_else(|| invalid("load", "the model has no layers".into()))?;
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed = up.matrix(&g.embed, v, h, precision)?;
        let lm_head = up.matrix(&g.lm_head, v, h, precision)?;
        let norm = up.vec(&g.norm)?;
        let weight_bytes = up.bytes;
        b.synchronize()?;
        Ok(Self {
            b,
            config: cfg,
            precision,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            weight_bytes,
        })
    }

    pub fn backend(&self) -> &Arc<CudaBackend> {
        &self.b
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Device bytes of the uploaded weights.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Experts held per sparse layer.
    pub fn loaded_experts(&self) -> Vec<(usize, Vec<usize>)> {
        self.layers
            .iter()
            .enumerate()
            .filter_map(|(l, layer)| match &layer.ffn {
                DevFfn::Sparse(m) => Some((
                    l,
                    (0..m.experts.len())
                        .filter(|&e| m.experts[e].is_some())
                        .collect(),
                )),
                DevFfn::Dense(_) => None,
            })
            .collect()
    }

    pub fn new_cache(&self) -> Result<CudaKvCache> {
        let w = self.config.num_kv_heads * self.config.head_dim;
        Ok(CudaKvCache {
            layers: (0..self.layers.len())
                .map(|_| self.b.new_kv(w))
                .collect::<Result<_>>()?,
        })
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let vocab = self.config.vocab_size;
        match tokens.iter().position(|&t| t as usize >= vocab) {
            Some(position) => Err(ringmoe_model::Error::TokenOutOfRange {
                id: tokens[position],
                position,
                vocab,
            }
            .into()),
            None => Ok(()),
        }
    }

    /// Runs the decoder stack on `tokens`, which follow the cached ones; returns the final
    /// hidden states `[tokens, hidden]` on the device (before the final norm) and the routing
    /// of each sparse layer.
    pub fn forward_hidden(
        &self,
        tokens: &[u32],
        cache: &mut CudaKvCache,
    ) -> Result<(DeviceTensor, Vec<(usize, Routing)>)> {
        let start = cache.len();
        let positions: Vec<usize> = (start..start + tokens.len()).collect();
        let (x, routing, _) = self.run_layers(
            tokens,
            &positions,
            cache,
            &Attend::Cached,
            None,
            &mut |_, _| Ok(()),
        )?;
        Ok((x, routing))
    }

    /// Embeds `tokens` (at `positions`) and runs every layer, attention as `attend` says and
    /// the routed experts over `group` when expert-parallel; `on_layer(done, layers)` after each
    /// layer (an error stops the pass). Returns the final hidden states (before the final norm),
    /// each sparse layer's routing and the expert-parallel figures.
    pub(crate) fn run_layers(
        &self,
        tokens: &[u32],
        positions: &[usize],
        cache: &mut CudaKvCache,
        attend: &Attend<'_>,
        group: Option<&Group<'_>>,
        on_layer: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<LayersOut> {
        if tokens.is_empty() {
            return Err(invalid("forward", "no tokens".into()));
        }
        self.check_tokens(tokens)?;
        if let Some(w) = self.config.min_window()
            && let Some(end) = positions.iter().max().map(|p| p + 1)
            && end > w
        {
            return Err(invalid(
                "forward",
                format!(
                    "sequence of {end} tokens exceeds a layer's sliding window of {w}; \
                     sliding-window attention is not implemented on the CUDA path (the CPU \
                     engine runs it)"
                ),
            ));
        }
        if cache.layers.len() != self.layers.len() || tokens.len() != positions.len() {
            return Err(invalid(
                "forward",
                format!(
                    "{} tokens at {} positions, a KV cache of {} layers for {}",
                    tokens.len(),
                    positions.len(),
                    cache.layers.len(),
                    self.layers.len()
                ),
            ));
        }
        let rope = self.b.rope_table(&self.rope.table(positions))?;
        let ids: Vec<usize> = tokens.iter().map(|&t| t as usize).collect();
        let mut x = self.b.gather_weight_rows(&self.embed, &ids)?;
        let mut routing = Vec::new();
        let mut stats = MoeStats::default();
        let n = self.layers.len();
        for (l, (layer, kv)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let r = self.layer_forward(
                l,
                layer,
                &mut x,
                (positions, &rope),
                kv,
                attend,
                group,
                &mut stats,
            )?;
            if let Some(r) = r {
                routing.push((l, r));
            }
            on_layer(l + 1, n)?;
        }
        Ok((x, routing, stats))
    }

    /// Final norm and lm_head on `[rows, hidden]` hidden states → `[rows, vocab]` on the host.
    pub fn logits(&self, hidden: &DeviceTensor) -> Result<ringmoe_core::Tensor> {
        self.b.download(&self.last_logits(hidden)?)
    }

    /// [`Self::logits`] left on the device.
    pub fn last_logits(&self, hidden: &DeviceTensor) -> Result<DeviceTensor> {
        let normed = self
            .b
            .rms_norm(hidden, &self.norm, self.config.rms_norm_eps)?;
        self.b.linear(&normed, &self.lm_head)
    }

    /// Logits of rows `start..end` of `[rows, hidden]` hidden states, on the host (scoring a
    /// long shard a few hundred rows at a time).
    pub fn logits_of_rows(
        &self,
        hidden: &DeviceTensor,
        start: usize,
        end: usize,
    ) -> Result<ringmoe_core::Tensor> {
        self.logits(&self.b.rows(hidden, start, end)?)
    }

    /// Forward pass returning logits for the requested positions.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut CudaKvCache,
        which: LogitsFor,
    ) -> Result<ForwardOutput> {
        let (hidden, routing) = self.forward_hidden(tokens, cache)?;
        let rows = match which {
            LogitsFor::All => hidden,
            LogitsFor::Last => self.b.rows(&hidden, tokens.len() - 1, tokens.len())?,
        };
        Ok(ForwardOutput {
            logits: self.logits(&rows)?,
            routing,
        })
    }

    /// A fresh prefill of `tokens`: the logits of the last position, `[1, vocab]`.
    pub fn prefill(&self, tokens: &[u32]) -> Result<ringmoe_core::Tensor> {
        let mut cache = self.new_cache()?;
        Ok(self.forward(tokens, &mut cache, LogitsFor::Last)?.logits)
    }

    /// Negative log-likelihood of each token given its prefix, lm_head in chunks of 512 rows.
    pub fn score(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        if tokens.len() < 2 {
            return Err(invalid(
                "score",
                format!("scoring needs at least 2 tokens, got {}", tokens.len()),
            ));
        }
        let mut cache = self.new_cache()?;
        let (hidden, _) = self.forward_hidden(tokens, &mut cache)?;
        let n = tokens.len() - 1;
        let vocab = self.config.vocab_size;
        let mut nll = Vec::with_capacity(n);
        const CHUNK: usize = 512;
        for s in (0..n).step_by(CHUNK) {
            let e = (s + CHUNK).min(n);
            let logits = self.logits_of_rows(&hidden, s, e)?;
            for (i, row) in logits.as_slice().chunks(vocab).enumerate() {
                nll.push(nll_of(row, tokens[s + i + 1] as usize));
            }
        }
        Ok(nll)
    }

    fn linear(&self, x: &DeviceTensor, l: &DevLinear) -> Result<DeviceTensor> {
        let mut y = self.b.linear(x, &l.w)?;
        if let Some(bias) = &l.bias {
            self.b.add_bias(&mut y, bias)?;
        }
        Ok(y)
    }

    fn mlp(&self, x: &DeviceTensor, m: &DevMlp) -> Result<DeviceTensor> {
        let gu = self.b.linear(x, &m.gate_up)?;
        self.b.linear(&self.b.swiglu(&gu)?, &m.down)
    }

    /// One decoder layer on `x` (the tokens at `positions`, with their RoPE table), its
    /// attention core as `attend` says, its routed experts over `group` when expert-parallel.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        l: usize,
        layer: &DevLayer,
        x: &mut DeviceTensor,
        (positions, rope): (&[usize], &DeviceRope),
        kv: &mut DeviceKv,
        attend: &Attend<'_>,
        group: Option<&Group<'_>>,
        stats: &mut MoeStats,
    ) -> Result<Option<Routing>> {
        let b = &*self.b;
        let t = positions.len();
        let a = &layer.attn;
        let p = a.params;
        let (hq, hkv, d) = (p.n_heads, p.n_kv_heads, p.head_dim);
        let normed = b.rms_norm(x, &layer.input_norm, layer.eps)?;
        let fused = self.linear(&normed, &a.qkv)?;
        let mut q = b.columns(&fused, 0, hq * d)?;
        let mut k = b.columns(&fused, hq * d, hkv * d)?;
        let v = b.columns(&fused, (hq + hkv) * d, hkv * d)?;
        drop(fused);
        if let Some((qn, kn)) = &a.qk_norm {
            q = b.rms_norm(&q.reshape(vec![t * hq, d])?, qn, layer.eps)?;
            k = b.rms_norm(&k.reshape(vec![t * hkv, d])?, kn, layer.eps)?;
        }
        b.rope_with(&mut q, hq, d, rope)?;
        b.rope_with(&mut k, hkv, d, rope)?;
        let out = match (attend, group) {
            (Attend::Cached, _) => {
                b.kv_append(kv, &k, &v, positions)?;
                b.attention_cached(&p, &q, positions, kv)?.0
            }
            (Attend::Ring(plan), Some(g)) => {
                b.kv_append(kv, &k, &v, positions)?;
                let own = (k.reshape(vec![t, hkv * d])?, v.reshape(vec![t, hkv * d])?);
                let q = q.reshape(vec![t, hq * d])?;
                let tag = Tag::new(0, l as u32, 0, Kind::Ring);
                ring_attention_on(b, g.comm, plan, &p, &AttentionMode::Dense, &q, own, tag)?
                    .part
                    .out
            }
            (Attend::Sharded { own }, Some(g)) => {
                if *own {
                    b.kv_append(kv, &k, &v, positions)?;
                }
                crate::shard::sharded_attention(b, g.comm, &p, &q, positions, kv)?
            }
            (_, None) => {
                return Err(invalid(
                    "forward",
                    "distributed attention without an NCCL group".into(),
                ));
            }
        };
        let o = self.linear(&out.reshape(vec![t, hq * d])?, &a.o)?;
        b.add_inplace(x, &o)?;
        let normed = b.rms_norm(x, &layer.post_norm, layer.eps)?;
        let ep = group.and_then(|g| g.ep.map(|ep| (g.comm, ep)));
        let (y, routing) = match &layer.ffn {
            DevFfn::Dense(m) => (self.mlp(&normed, m)?, None),
            DevFfn::Sparse(m) => {
                let (y, r) = self.moe(l, &normed, m, ep, stats)?;
                (y, Some(r))
            }
        };
        b.add_inplace(x, &y)?;
        Ok(routing)
    }

    /// The sparse block of layer `layer` on its normalised input `x` `[rows, hidden]`: router,
    /// routed experts (all must be loaded here), shared expert. For benchmarks of the MoE layer.
    pub fn moe_layer(&self, layer: usize, x: &DeviceTensor) -> Result<(DeviceTensor, Routing)> {
        match self.layers.get(layer).map(|l| &l.ffn) {
            Some(DevFfn::Sparse(m)) => self.moe(layer, x, m, None, &mut MoeStats::default()),
            _ => Err(invalid(
                "moe_layer",
                format!("layer {layer} is not a sparse layer of this model"),
            )),
        }
    }

    /// Uploads `[rows, hidden]` host rows (benchmark inputs).
    pub fn upload(&self, x: &ringmoe_core::Tensor) -> Result<DeviceTensor> {
        self.b.upload(x)
    }

    /// Router, routed experts (on this GPU, or expert-parallel over `ep`'s group), shared expert.
    fn moe(
        &self,
        l: usize,
        x: &DeviceTensor,
        m: &DevMoe,
        ep: Option<(&NcclCommunicator, &ExpertParallel)>,
        stats: &mut MoeStats,
    ) -> Result<(DeviceTensor, Routing)> {
        let b = &*self.b;
        let logits = self.linear(x, &m.router)?;
        let (weights, expert_ids) =
            b.router_topk(&logits, m.top_k, m.norm == TopKNorm::Renormalize)?;
        let routing = Routing {
            top_k: m.top_k,
            expert_ids,
            weights,
        };
        let mut y = match ep {
            None => self.experts(x, &routing, m)?,
            Some((comm, ep)) => {
                let loaded = |e: usize| m.experts.get(e).is_some_and(Option::is_some);
                let mut compute = |rows: &DeviceTensor,
                                   groups: &[(usize, usize)]|
                 -> ringmoe_parallel::Result<DeviceTensor> {
                    Ok(self.grouped_experts(rows, groups, m)?)
                };
                let (y, s) = moe_parallel_on(
                    b,
                    comm,
                    ep,
                    (l, m.experts.len()),
                    &loaded,
                    x,
                    &routing,
                    Tag::new(0, l as u32, 0, Kind::Dispatch),
                    &mut compute,
                )?;
                stats.add(&s);
                y
            }
        };
        if let Some((mlp, gate)) = &m.shared {
            let s = self.mlp(x, mlp)?;
            let g = self.linear(x, gate)?;
            b.add_gated(&mut y, &s, &g)?;
        }
        Ok((y, routing))
    }

    /// Rows grouped per expert (`groups`: `(expert, rows)` in row order) through their experts'
    /// grouped gate/up GEMM, SwiGLU and grouped down GEMM; results in the same row order.
    fn grouped_experts(
        &self,
        rows: &DeviceTensor,
        groups: &[(usize, usize)],
        m: &DevMoe,
    ) -> Result<DeviceTensor> {
        let b = &*self.b;
        let mut gate_up = Vec::with_capacity(groups.len());
        let mut down = Vec::with_capacity(groups.len());
        for &(e, _) in groups {
            let w = m.experts.get(e).and_then(Option::as_ref).ok_or_else(|| {
                invalid(
                    "moe",
                    format!("expert {e} is routed to but not loaded on this GPU"),
                )
            })?;
            gate_up.push(&w.gate_up);
            down.push(&w.down);
        }
        let counts: Vec<usize> = groups.iter().map(|g| g.1).collect();
        let gu = b.grouped_linear(rows, &counts, &gate_up)?;
        b.grouped_linear(&b.swiglu(&gu)?, &counts, &down)
    }

    /// plan → gather → grouped gate/up GEMM → SwiGLU → grouped down GEMM → combine, every
    /// routed expert on this GPU.
    fn experts(&self, x: &DeviceTensor, routing: &Routing, m: &DevMoe) -> Result<DeviceTensor> {
        let b = &*self.b;
        let plan = moe::plan(routing, m.experts.len())?;
        let groups = plan.groups();
        let token_of_row: Vec<usize> = (0..plan.slot_of_row.len())
            .map(|r| plan.token_of_row(r))
            .collect();
        let xg = b.gather_rows(x, &token_of_row)?;
        let yg = self.grouped_experts(&xg, &groups, m)?;
        let (rows, ws) = moe::combine_plan(routing, |s| plan.row_of_slot[s] as usize);
        b.combine(&yg, &rows, &ws, routing.top_k)
    }
}
