//! Mixtral (`MixtralForCausalLM`), reproducing transformers' `models/mixtral/modeling_mixtral.py`
//! (https://github.com/huggingface/transformers/blob/main/src/transformers/models/mixtral/modeling_mixtral.py).
//!
//! - Attention: grouped-query, no biases, RoPE, causal (sliding window only if configured).
//! - Every layer is sparse: `block_sparse_moe.gate` is the router (softmax over all experts in
//!   f32, top-k, always renormalised); experts `block_sparse_moe.experts.E.{w1,w3,w2}` are the
//!   SwiGLU gate, up and down projections of size `intermediate_size`.

use crate::Result;
use crate::layers::{DecoderLayer, Mlp, WeightLoader};
use crate::model::ExpertSelection;
use crate::moe::TopKNorm;

pub(crate) fn load_layer(
    w: &WeightLoader<'_>,
    layer: usize,
    sel: &ExpertSelection,
) -> Result<DecoderLayer> {
    let p = format!("model.layers.{layer}");
    let attn = super::attention(w, &p, layer)?;
    let m = format!("{p}.block_sparse_moe");
    let moe = super::sparse_moe(
        w,
        layer,
        sel,
        &m,
        expert_names(&m),
        TopKNorm::Renormalize,
        None,
    )?;
    super::decoder_layer(w, &p, attn, Mlp::Sparse(moe))
}

/// `{prefix}.experts.E.{w1,w3,w2}`: gate, up and down.
pub(crate) fn expert_names(prefix: &str) -> impl Fn(usize) -> (String, String, String) + '_ {
    move |e| {
        (
            format!("{prefix}.experts.{e}.w1"),
            format!("{prefix}.experts.{e}.w3"),
            format!("{prefix}.experts.{e}.w2"),
        )
    }
}
