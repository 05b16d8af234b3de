//! Qwen3-MoE (`Qwen3MoeForCausalLM`), reproducing transformers' `models/qwen3_moe/modeling_qwen3_moe.py`
//! (https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen3_moe/modeling_qwen3_moe.py).
//!
//! - Attention: grouped-query, `head_dim` may differ from `hidden/heads`, per-head RMSNorm of q and
//!   k (`q_norm`, `k_norm`) before RoPE, biases only with `attention_bias`.
//! - Layer `l` is sparse unless listed in `mlp_only_layers` or `(l + 1) % decoder_sparse_step != 0`;
//!   dense layers use `mlp.{gate,up,down}_proj` of `intermediate_size`.
//! - Router `mlp.gate`: softmax in f32, top-k, renormalised only with `norm_topk_prob`; experts
//!   `mlp.experts.E.{gate,up,down}_proj` of `moe_intermediate_size`.

use crate::Result;
use crate::layers::{DecoderLayer, Mlp, WeightLoader};
use crate::model::ExpertSelection;

pub(crate) fn load_layer(
    w: &WeightLoader<'_>,
    layer: usize,
    sel: &ExpertSelection,
) -> Result<DecoderLayer> {
    let p = format!("model.layers.{layer}");
    let attn = super::attention(w, &p, layer)?;
    let m = format!("{p}.mlp");
    let mlp = if w.cfg.sparse_layers[layer] {
        Mlp::Sparse(super::sparse_moe(
            w,
            layer,
            sel,
            &m,
            super::qwen_expert_names(&m),
            super::qwen_topk_norm(w),
            None,
        )?)
    } else {
        Mlp::Dense(super::swiglu_mlp(w, &m, w.cfg.dense_intermediate_size)?)
    };
    super::decoder_layer(w, &p, attn, mlp)
}
