//! One file per architecture: how its checkpoint names map onto the shared layers. Shared here:
//! the attention block and the decoder-layer norms, which all three name the same way.

pub mod mixtral;
pub mod qwen2_moe;
pub mod qwen3_moe;

use ringmoe_core::attention::AttentionParams;

use crate::Result;
use crate::config::Architecture;
use crate::layers::{Attention, DecoderLayer, DenseMlp, Linear, Mlp, SparseMoe, WeightLoader};
use crate::model::ExpertSelection;
use crate::moe::{ExpertSet, ExpertWeights, TopKNorm};
use crate::rope::rope_freqs;

/// Loads decoder layer `layer` of whichever architecture the config names.
pub(crate) fn load_layer(
    w: &WeightLoader<'_>,
    layer: usize,
    sel: &ExpertSelection,
) -> Result<DecoderLayer> {
    match w.cfg.architecture {
        Architecture::Mixtral => mixtral::load_layer(w, layer, sel),
        Architecture::Qwen3Moe => qwen3_moe::load_layer(w, layer, sel),
        Architecture::Qwen2Moe => qwen2_moe::load_layer(w, layer, sel),
    }
}

/// The checkpoint names of routed expert `expert` of layer `layer`: its (gate, up, down)
/// projections (what an incremental expert load reads).
pub(crate) fn expert_names(
    arch: Architecture,
    layer: usize,
    expert: usize,
) -> (String, String, String) {
    let p = format!("model.layers.{layer}");
    match arch {
        Architecture::Mixtral => mixtral::expert_names(&format!("{p}.block_sparse_moe"))(expert),
        Architecture::Qwen3Moe | Architecture::Qwen2Moe => {
            qwen_expert_names(&format!("{p}.mlp"))(expert)
        }
    }
}

/// `{prefix}.self_attn.{q,k,v,o}_proj` (+ biases, + `q_norm`/`k_norm` as the config says), with
/// layer `layer`'s sliding window.
pub(crate) fn attention(w: &WeightLoader<'_>, prefix: &str, layer: usize) -> Result<Attention> {
    let c = w.cfg;
    let (h, d, hq, hkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
    let a = format!("{prefix}.self_attn");
    let qkv = w.fused_linear(
        &[
            (&format!("{a}.q_proj"), hq * d),
            (&format!("{a}.k_proj"), hkv * d),
            (&format!("{a}.v_proj"), hkv * d),
        ],
        h,
        c.qkv_bias,
    )?;
    let qk_norm = if c.qk_norm {
        Some((
            w.vector(&format!("{a}.q_norm.weight"), d)?,
            w.vector(&format!("{a}.k_norm.weight"), d)?,
        ))
    } else {
        None
    };
    Ok(Attention {
        qkv,
        o: w.linear(&format!("{a}.o_proj"), h, hq * d, c.o_bias)?,
        qk_norm,
        params: AttentionParams {
            n_heads: hq,
            n_kv_heads: hkv,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
            causal: true,
        },
        rope: rope_freqs(&c.rope, d),
        eps: c.rms_norm_eps,
        window: c.window(layer),
    })
}

/// Wraps attention and an MLP with `{prefix}.input_layernorm` / `post_attention_layernorm`.
pub(crate) fn decoder_layer(
    w: &WeightLoader<'_>,
    prefix: &str,
    attn: Attention,
    mlp: Mlp,
) -> Result<DecoderLayer> {
    let h = w.cfg.hidden_size;
    Ok(DecoderLayer {
        input_norm: w.vector(&format!("{prefix}.input_layernorm.weight"), h)?,
        attn,
        post_attn_norm: w.vector(&format!("{prefix}.post_attention_layernorm.weight"), h)?,
        mlp,
        eps: w.cfg.rms_norm_eps,
    })
}

/// `{prefix}.{gate,up,down}_proj`: a SwiGLU MLP as Llama-family checkpoints name it.
pub(crate) fn swiglu_mlp(w: &WeightLoader<'_>, prefix: &str, inter: usize) -> Result<DenseMlp> {
    Ok(DenseMlp(w.expert(
        &format!("{prefix}.gate_proj"),
        &format!("{prefix}.up_proj"),
        &format!("{prefix}.down_proj"),
        inter,
    )?))
}

/// A sparse MoE block: the router `{prefix}.gate` and the experts of `layer` that `sel` asks for,
/// expert `e` being `names(e) = (gate, up, down)` projections of `expert_intermediate_size`.
pub(crate) fn sparse_moe(
    w: &WeightLoader<'_>,
    layer: usize,
    sel: &ExpertSelection,
    prefix: &str,
    names: impl Fn(usize) -> (String, String, String),
    norm: TopKNorm,
    shared: Option<(DenseMlp, Linear)>,
) -> Result<SparseMoe> {
    let c = w.cfg;
    let experts = (0..c.moe.num_experts)
        .map(|e| -> Result<Option<ExpertWeights>> {
            if !sel.includes(layer, e) {
                return Ok(None);
            }
            let (g, u, d) = names(e);
            Ok(Some(w.expert(
                &g,
                &u,
                &d,
                c.moe.expert_intermediate_size,
            )?))
        })
        .collect::<Result<_>>()?;
    Ok(SparseMoe {
        router: w.linear_f32(&format!("{prefix}.gate"), c.moe.num_experts, c.hidden_size)?,
        experts: ExpertSet { layer, experts },
        top_k: c.moe.top_k,
        norm,
        shared,
    })
}

/// Expert names of the Qwen MoE family: `{prefix}.experts.E.{gate,up,down}_proj`.
pub(crate) fn qwen_expert_names(prefix: &str) -> impl Fn(usize) -> (String, String, String) + '_ {
    move |e| {
        (
            format!("{prefix}.experts.{e}.gate_proj"),
            format!("{prefix}.experts.{e}.up_proj"),
            format!("{prefix}.experts.{e}.down_proj"),
        )
    }
}

/// Qwen routers renormalise the top-k probabilities only with `norm_topk_prob`.
pub(crate) fn qwen_topk_norm(w: &WeightLoader<'_>) -> TopKNorm {
    if w.cfg.moe.norm_topk_prob {
        TopKNorm::Renormalize
    } else {
        TopKNorm::Softmax
    }
}
