//! The single-process model: embedding, decoder layers, final norm and lm_head, with a forward that
//! serves prefill (many tokens) and decode (one token) over a [`KvCache`].

use std::path::Path;

use std::sync::Arc;

use ringmoe_core::{Backend, Cpu, Stored, Tensor, WeightPrecision, Weights};

use crate::arch;
use crate::checkpoint::{Checkpoint, TensorSource};
use crate::config::ModelConfig;
use crate::kv_cache::KvCache;
use crate::layers::{DecoderLayer, Mlp, WeightLoader};
use crate::moe::Routing;
use crate::{Error, Result};

pub use ringmoe_plan::ExpertSelection;

/// Options for [`Model::load`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub experts: ExpertSelection,
    /// The precision matrices are held in (`--weights`); norms, biases and routers stay f32.
    pub weights: WeightPrecision,
}

/// Each sparse layer's routing, by layer index.
pub type LayerRouting = Vec<(usize, Routing)>;

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only the last position (generation).
    Last,
    /// Every position (scoring, parity checks).
    All,
}

/// Result of a forward pass: `[positions, vocab]` logits and, per sparse layer, its routing.
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    pub logits: Tensor,
    pub routing: Vec<(usize, Routing)>,
}

/// A loaded model on backend `B` (the CPU by default). Cloning is cheap: the host weights are
/// shared, and the backend is behind an `Arc`.
pub struct Model<B: Backend = Cpu> {
    b: Arc<B>,
    pub config: ModelConfig,
    embed: B::Weight,
    layers: Vec<DecoderLayer<B>>,
    norm: B::Vector,
    lm_head: B::Weight,
}

impl<B: Backend + Clone> Clone for Model<B> {
    fn clone(&self) -> Self {
        Self {
            b: self.b.clone(),
            config: self.config.clone(),
            embed: self.embed.clone(),
            layers: self.layers.clone(),
            norm: self.norm.clone(),
            lm_head: self.lm_head.clone(),
        }
    }
}

impl<B: Backend> std::fmt::Debug for Model<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Model<Cpu> {
    /// Loads `DIR/config.json` and the weights the options select from `DIR`'s safetensors.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        Self::load_on(Arc::new(Cpu), dir, opts)
    }

    /// Builds the model from any tensor source (a [`Checkpoint`], or random weights for benches).
    pub fn from_checkpoint(
        cfg: ModelConfig,
        ckpt: &dyn TensorSource,
        opts: &LoadOptions,
    ) -> Result<Self> {
        Self::from_source_on(Arc::new(Cpu), cfg, ckpt, opts)
    }
}

impl<B: Backend> Model<B> {
    /// [`Model::load`] onto backend `b`.
    pub fn load_on(b: Arc<B>, dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let cfg = ModelConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        Self::from_source_on(b, cfg, &ckpt, opts)
    }

    /// [`Model::from_checkpoint`] onto backend `b`: the host reads one layer at a time and
    /// hands it to the backend (which uploads it, or, on the CPU, keeps it as it is).
    pub fn from_source_on(
        b: Arc<B>,
        cfg: ModelConfig,
        ckpt: &dyn TensorSource,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let mut layers = Vec::with_capacity(cfg.num_layers);
        let p = opts.weights;
        let g = load_parts(&cfg, ckpt, &opts.experts, p, |_, layer| -> Result<()> {
            layers.push(layer.into_backend(&*b, p)?);
            Ok(())
        })?;
        Ok(Self {
            embed: b.weight(g.embed, p, false)?,
            lm_head: b.weight(g.lm_head, p, false)?,
            norm: b.vector(g.norm)?,
            b,
            config: cfg,
            layers,
        })
    }

    /// The backend the model lives on.
    pub fn backend(&self) -> &Arc<B> {
        &self.b
    }

    /// Bytes of weights held in memory, each matrix in the precision it is held in.
    pub fn weight_bytes(&self) -> usize {
        self.embed.bytes()
            + self.lm_head.bytes()
            + self.norm.bytes()
            + self
                .layers
                .iter()
                .map(DecoderLayer::weight_bytes)
                .sum::<usize>()
    }

    /// Weight bytes one single-token decode step reads: every matrix and vector except the
    /// embedding table (one row of it) and the routed experts, of which `top_k` per sparse layer
    /// at their mean size. What a memory-bound decode streams per token.
    pub fn decode_bytes_per_token(&self) -> usize {
        let mut bytes = self.lm_head.bytes()
            + self.norm.bytes()
            + self.embed.bytes() / self.config.vocab_size.max(1);
        for l in &self.layers {
            bytes += l.weight_bytes();
            if let Mlp::Sparse(m) = &l.mlp {
                let held: Vec<usize> = m
                    .experts
                    .experts
                    .iter()
                    .flatten()
                    .map(|e| e.bytes())
                    .collect();
                let all: usize = held.iter().sum();
                let mean = all / held.len().max(1);
                bytes = bytes - all + m.top_k.min(held.len()) * mean;
            }
        }
        bytes
    }

    pub fn layers(&self) -> &[DecoderLayer<B>] {
        &self.layers
    }

    /// An empty K/V cache on the backend (on the CPU, [`Model::new_cache`] cannot fail).
    pub fn try_new_cache(&self) -> Result<KvCache<B>> {
        let w = self.config.num_kv_heads * self.config.head_dim;
        Ok(KvCache {
            layers: (0..self.layers.len())
                .map(|_| self.b.new_kv(w))
                .collect::<std::result::Result<_, _>>()?,
        })
    }

    /// Checks token ids against the vocabulary.
    pub fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let vocab = self.config.vocab_size;
        match tokens.iter().position(|&t| t as usize >= vocab) {
            Some(position) => Err(Error::TokenOutOfRange {
                id: tokens[position],
                position,
                vocab,
            }),
            None => Ok(()),
        }
    }

    /// Embedding rows of `tokens`, `[tokens, hidden]`.
    pub fn embed(&self, tokens: &[u32]) -> Result<B::Act> {
        self.check_tokens(tokens)?;
        let ids: Vec<usize> = tokens.iter().map(|&t| t as usize).collect();
        Ok(self.b.weight_rows(&self.embed, &ids)?)
    }

    /// Final norm and lm_head on `hidden` rows (`[rows, hidden]`), giving `[rows, vocab]` on
    /// the host.
    pub fn logits(&self, hidden: &B::Act) -> Result<Tensor> {
        let b = &*self.b;
        b.step(|| {
            let normed = b.rms_norm(hidden, &self.norm, self.config.rms_norm_eps)?;
            Ok(b.download_owned(b.linear(&normed, &self.lm_head, None)?)?)
        })
    }

    /// Runs the decoder stack on `tokens`, which follow the cached ones, and returns the final
    /// hidden states (before the final norm) plus the routing of each sparse layer.
    pub fn forward_hidden(
        &self,
        tokens: &[u32],
        cache: &mut KvCache<B>,
    ) -> Result<(B::Act, LayerRouting)> {
        self.run_layers(tokens, cache, false)
    }

    /// [`Self::forward_hidden`] with `last_only`: the exact last-layer shortcut. The last layer
    /// still computes (and caches) K/V for every token, but attention, the MLP and the residuals
    /// only for the final one, which is all generation needs; the result is that one row, and
    /// the last sparse layer's routing covers only it.
    fn run_layers(
        &self,
        tokens: &[u32],
        cache: &mut KvCache<B>,
        last_only: bool,
    ) -> Result<(B::Act, LayerRouting)> {
        self.b
            .step(|| self.run_layers_here(tokens, cache, last_only))
    }

    /// [`Self::run_layers`] on the calling thread.
    fn run_layers_here(
        &self,
        tokens: &[u32],
        cache: &mut KvCache<B>,
        last_only: bool,
    ) -> Result<(B::Act, LayerRouting)> {
        if tokens.is_empty() {
            return Err(Error::InvalidInput("forward called with no tokens".into()));
        }
        if cache.layers.len() != self.layers.len() {
            return Err(Error::InvalidInput(format!(
                "KV cache has {} layers, model {}",
                cache.layers.len(),
                self.layers.len()
            )));
        }
        let b = &*self.b;
        let start = cache.len();
        let end = start + tokens.len();
        let positions: Vec<usize> = (start..end).collect();
        let mut x = self.embed(tokens)?;
        let mut routing = Vec::new();
        // Every layer shares one RoPE configuration, so the table is computed once per forward.
        let rope = match self.layers.first() {
            Some(l) => b.rope_table(l.attn.rope.table(&positions))?,
            None => return Err(Error::InvalidInput("model has no layers".into())),
        };
        let n = self.layers.len();
        for (l, (layer, kv)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let r = if last_only && l + 1 == n {
                layer.forward_last(b, &mut x, &positions, &rope, kv)?
            } else {
                layer.forward(b, &mut x, &positions, &rope, kv)?
            };
            // A sliding-window layer keeps only what later tokens can see.
            layer.attn.trim_cache(b, kv, end)?;
            if let Some(r) = r {
                routing.push((l, r));
            }
        }
        Ok((x, routing))
    }

    /// Forward pass returning logits for the requested positions. [`LogitsFor::Last`] takes the
    /// exact last-layer shortcut ([`DecoderLayer::forward_last`]): the last sparse layer's
    /// routing then covers only the final position.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache<B>,
        which: LogitsFor,
    ) -> Result<ForwardOutput> {
        // One step for the stack and the lm_head: nested steps run in place.
        self.b.step(|| {
            let (rows, routing) = self.run_layers(tokens, cache, which == LogitsFor::Last)?;
            Ok(ForwardOutput {
                logits: self.logits(&rows)?,
                routing,
            })
        })
    }

    /// A fresh prefill of `tokens`: the logits of the last position, `[1, vocab]`.
    pub fn prefill(&self, tokens: &[u32]) -> Result<Tensor> {
        let mut cache = self.try_new_cache()?;
        Ok(self.forward(tokens, &mut cache, LogitsFor::Last)?.logits)
    }

    /// Negative log-likelihood of each token given its prefix (`tokens.len() − 1` values), with
    /// lm_head applied in chunks so a long sequence never holds `[L, vocab]` logits at once.
    pub fn score(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        if tokens.len() < 2 {
            return Err(Error::InvalidInput(format!(
                "scoring needs at least 2 tokens, got {}",
                tokens.len()
            )));
        }
        let mut cache = self.try_new_cache()?;
        let (hidden, _) = self.forward_hidden(tokens, &mut cache)?;
        self.nll_of_rows(&hidden, tokens, 0)
    }

    /// The NLL of `tokens[first + i + 1]` under hidden row `i` for every row of `hidden` that has
    /// a next token, lm_head applied 512 rows at a time.
    pub fn nll_of_rows(&self, hidden: &B::Act, tokens: &[u32], first: usize) -> Result<Vec<f32>> {
        let rows = self.b.dims(hidden)?.0;
        let n = rows.min(tokens.len().saturating_sub(first + 1));
        let mut nll = Vec::with_capacity(n);
        const CHUNK: usize = 512;
        for s in (0..n).step_by(CHUNK) {
            let e = (s + CHUNK).min(n);
            let logits = self.logits(&self.b.rows(hidden, s, e)?)?;
            for (i, row) in logits.as_slice().chunks(self.config.vocab_size).enumerate() {
                nll.push(nll_of(row, tokens[first + s + i + 1] as usize));
            }
        }
        Ok(nll)
    }

    /// Experts held per sparse layer (for load reports and tests).
    pub fn loaded_experts(&self) -> Vec<(usize, Vec<usize>)> {
        self.layers
            .iter()
            .enumerate()
            .filter_map(|(l, layer)| match &layer.mlp {
                Mlp::Sparse(m) => Some((l, m.experts.loaded())),
                Mlp::Dense(_) => None,
            })
            .collect()
    }
}

impl Model<Cpu> {
    /// An empty host K/V cache.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// The same model holding the routed experts `sel` selects (in `precision`, read from
    /// `ckpt`): experts it holds already and still needs are shared with `self`, the others are
    /// read, and the ones `sel` no longer names are left out. Everything else (attention, norms,
    /// routers, dense MLPs, embeddings) is shared, never read again. While both versions live,
    /// only the experts that differ exist twice.
    pub fn with_experts(
        &self,
        ckpt: &dyn TensorSource,
        sel: &ExpertSelection,
        precision: WeightPrecision,
    ) -> Result<(Self, ExpertDelta)> {
        let w = WeightLoader {
            ckpt,
            cfg: &self.config,
            precision,
        };
        let inter = self.config.moe.expert_intermediate_size;
        let mut next = self.clone();
        let mut delta = ExpertDelta::default();
        for (l, layer) in next.layers.iter_mut().enumerate() {
            let Mlp::Sparse(m) = &mut layer.mlp else {
                continue;
            };
            for (e, slot) in m.experts.experts.iter_mut().enumerate() {
                match (sel.includes(l, e), slot.is_some()) {
                    (true, false) => {
                        let (g, u, d) = crate::arch::expert_names(self.config.architecture, l, e);
                        let x = w.expert(&g, &u, &d, inter)?;
                        delta.loaded += 1;
                        delta.loaded_bytes += x.bytes();
                        *slot = Some(x);
                    }
                    (false, true) => {
                        delta.dropped += 1;
                        delta.dropped_bytes += slot.as_ref().map_or(0, |x| x.bytes());
                        *slot = None;
                    }
                    (true, true) => delta.kept += 1,
                    (false, false) => {}
                }
            }
        }
        Ok((next, delta))
    }
}

/// What [`Model::with_experts`] changed: experts read, kept (shared) and dropped, and the bytes
/// of the ones read and dropped, in their in-memory precision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpertDelta {
    pub loaded: usize,
    pub kept: usize,
    pub dropped: usize,
    pub loaded_bytes: usize,
    pub dropped_bytes: usize,
}

/// The weights outside the decoder layers, `[vocab, hidden]` tables and the final norm.
#[derive(Debug, Clone)]
pub struct ModelGlobals {
    pub embed: Weights,
    pub norm: Vec<f32>,
    /// A copy of `embed` when the checkpoint ties them.
    pub lm_head: Weights,
}

/// Reads a checkpoint's weights one decoder layer at a time: `layer(l, weights)` is called for
/// every layer in order (holding only the experts `experts` selects), then the embedding, final
/// norm and lm_head are returned. Another backend's loader (the CUDA model uploads each layer and
/// drops it) never holds more than one layer on the host.
pub fn load_parts<E: From<Error>>(
    cfg: &ModelConfig,
    ckpt: &dyn TensorSource,
    experts: &ExpertSelection,
    precision: WeightPrecision,
    mut layer: impl FnMut(usize, DecoderLayer) -> std::result::Result<(), E>,
) -> std::result::Result<ModelGlobals, E> {
    let w = WeightLoader {
        ckpt,
        cfg,
        precision,
    };
    let (v, h) = (cfg.vocab_size, cfg.hidden_size);
    // The embedding first: a checkpoint whose config does not match is named by its first tensor.
    let embed = w.matrix("model.embed_tokens.weight", v, h)?;
    let lm_head = if ckpt.contains("lm_head.weight") || !cfg.tie_word_embeddings {
        w.matrix("lm_head.weight", v, h)?
    } else {
        embed.clone()
    };
    for l in 0..cfg.num_layers {
        layer(l, arch::load_layer(&w, l, experts)?)?;
    }
    Ok(ModelGlobals {
        embed,
        norm: w.vector("model.norm.weight", h)?,
        lm_head,
    })
}

/// `−log softmax(row)[target]`, computed in f64.
pub fn nll_of(row: &[f32], target: usize) -> f32 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
    (m + z.ln() - row[target] as f64) as f32
}
