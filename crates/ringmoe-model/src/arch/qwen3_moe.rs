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
use crate::layers::{DecoderLayer, DenseMlp, Mlp, SparseMoe, WeightLoader};
use crate::model::ExpertSelection;
use crate::moe::TopKNorm;

pub(crate) fn load_layer(
    w: &WeightLoader<'_>,
    layer: usize,
    sel: &ExpertSelection,
) -> Result<DecoderLayer> {
    let c = w.cfg;
    let p = format!("model.layers.{layer}");
    let attn = super::attention(w, &p)?;
    let m = format!("{p}.mlp");
    let mlp = if c.sparse_layers[layer] {
        let experts = super::experts(w, layer, sel, c.moe.expert_intermediate_size, |e| {
            (
                format!("{m}.experts.{e}.gate_proj"),
                format!("{m}.experts.{e}.up_proj"),
                format!("{m}.experts.{e}.down_proj"),
            )
        })?;
        Mlp::Sparse(SparseMoe {
            router: w.linear(
                &format!("{m}.gate"),
                c.moe.num_experts,
                c.hidden_size,
                false,
            )?,
            experts,
            top_k: c.moe.top_k,
            norm: if c.moe.norm_topk_prob {
                TopKNorm::Renormalize
            } else {
                TopKNorm::Softmax
            },
            shared: None,
        })
    } else {
        Mlp::Dense(DenseMlp(w.expert(
            &format!("{m}.gate_proj"),
            &format!("{m}.up_proj"),
            &format!("{m}.down_proj"),
            c.dense_intermediate_size,
        )?))
    };
    super::decoder_layer(w, &p, attn, mlp)
}
