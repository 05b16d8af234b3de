//! Qwen2-MoE (`Qwen2MoeForCausalLM`), reproducing transformers' `models/qwen2_moe/modeling_qwen2_moe.py`
//! (https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen2_moe/modeling_qwen2_moe.py).
//!
//! - Attention: grouped-query with q/k/v biases (`qkv_bias`, default true), no bias on o_proj.
//! - Sparse layers as in Qwen3-MoE (`mlp_only_layers`, `decoder_sparse_step`); router `mlp.gate`,
//!   renormalised only with `norm_topk_prob`; experts `mlp.experts.E.{gate,up,down}_proj`.
//! - Plus a shared expert on every token: `routed + sigmoid(x · shared_expert_gate) ·
//!   SwiGLU_shared(x)`, with `mlp.shared_expert.{gate,up,down}_proj` of
//!   `shared_expert_intermediate_size` and the `[1, hidden]` gate `mlp.shared_expert_gate`.

use crate::layers::{DecoderLayer, Mlp, WeightLoader};
use crate::model::ExpertSelection;
use crate::{Error, Result};

pub(crate) fn load_layer(
    w: &WeightLoader<'_>,
    layer: usize,
    sel: &ExpertSelection,
) -> Result<DecoderLayer> {
    let c = w.cfg;
    let p = format!("model.layers.{layer}");
    let attn = super::attention(w, &p, layer)?;
    let m = format!("{p}.mlp");
    let mlp = if c.sparse_layers[layer] {
        let shared_inter = c
            .moe
            .shared_expert_intermediate_size
            .ok_or_else(|| Error::Config {
                field: "shared_expert_intermediate_size".into(),
                msg: "missing".into(),
            })?;
        let shared = super::swiglu_mlp(w, &format!("{m}.shared_expert"), shared_inter)?;
        let gate = w.linear_f32(&format!("{m}.shared_expert_gate"), 1, c.hidden_size)?;
        Mlp::Sparse(super::sparse_moe(
            w,
            layer,
            sel,
            &m,
            super::qwen_expert_names(&m),
            super::qwen_topk_norm(w),
            Some((shared, gate)),
        )?)
    } else {
        Mlp::Dense(super::swiglu_mlp(w, &m, c.dense_intermediate_size)?)
    };
    super::decoder_layer(w, &p, attn, mlp)
}
