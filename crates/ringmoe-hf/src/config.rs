//! `config.json` and `generation_config.json` as users download them, in both the transformers-4
//! (hub) style and the transformers-5 style, turned into one validated [`ModelConfig`].
//!
//! Differences handled here, so that no other code sees them:
//! - RoPE: top-level `rope_theta` + optional `rope_scaling {type|rope_type, factor, …}` (v4) or
//!   `rope_parameters {rope_theta, rope_type, …}` (v5).
//! - `head_dim` absent or `null` means `hidden_size / num_attention_heads`.
//! - Qwen MoE expert count: `num_experts` (v4) or `num_local_experts` (v5).

use std::path::Path;

use serde_json::{Map, Value};

use crate::{Error, Result};

/// The architectures ringmoe implements, by their `architectures[0]` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Mixtral,
    Qwen3Moe,
    Qwen2Moe,
}

impl Architecture {
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "MixtralForCausalLM" => Ok(Self::Mixtral),
            "Qwen3MoeForCausalLM" => Ok(Self::Qwen3Moe),
            "Qwen2MoeForCausalLM" => Ok(Self::Qwen2Moe),
            other => Err(Error::UnknownArchitecture {
                name: other.to_string(),
            }),
        }
    }
}

/// How rotary frequencies are derived from the base ones.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor` (frequencies divided by it).
    Linear {
        factor: f64,
    },
    /// YaRN (arXiv:2309.00071) as transformers implements it.
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: Option<f64>,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub partial_rotary_factor: f64,
    pub scaling: RopeScaling,
}

/// The mixture-of-experts block of the sparse layers.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    /// Intermediate size of one routed expert.
    pub expert_intermediate_size: usize,
    /// Renormalise the top-k probabilities to sum to one.
    pub norm_topk_prob: bool,
    /// Qwen2-MoE's always-on shared expert (with a sigmoid gate), by intermediate size.
    pub shared_expert_intermediate_size: Option<usize>,
}

/// Everything the forward needs from `config.json`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v projections (Qwen2-MoE; Qwen3-MoE's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Qwen3-MoE's `attention_bias`).
    pub o_bias: bool,
    /// Per-head RMSNorm of q and k before RoPE (Qwen3-MoE).
    pub qk_norm: bool,
    pub moe: MoeConfig,
    /// Intermediate size of the dense MLP used in non-sparse layers.
    pub dense_intermediate_size: usize,
    /// `sparse_layers[l]`: layer `l` uses the MoE block (else the dense MLP).
    pub sparse_layers: Vec<bool>,
    /// Per layer, its sliding-window span (a query at `p` sees keys `p − w + 1 ..= p`), or
    /// `None` for full causal attention: transformers' `layer_types`, or the architecture's rule
    /// for older configs (see [`parse_layer_windows`]).
    pub layer_windows: Vec<Option<usize>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// Sampling defaults and stop tokens from `generation_config.json`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub do_sample: Option<bool>,
}

pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Typed access to a JSON object with errors that name the field.
struct Fields<'a>(&'a Map<String, Value>, &'a str);

impl Fields<'_> {
    fn err(&self, field: &str, msg: impl Into<String>) -> Error {
        let field = if self.1.is_empty() {
            field.to_string()
        } else {
            format!("{}.{field}", self.1)
        };
        Error::Config {
            field,
            msg: msg.into(),
        }
    }

    fn present(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| self.err(key, format!("expected a non-negative integer, got {v}"))),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.err(key, "missing"))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a number, got {v}"))),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected true or false, got {v}"))),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a string, got {v}"))),
        }
    }

    /// A token id or a list of them (HF allows both for `eos_token_id`).
    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        let bad = |v: &Value| {
            self.err(
                key,
                format!("expected a token id or a list of ids, got {v}"),
            )
        };
        match self.present(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().map(|x| x as u32).ok_or_else(|| bad(v)))
                .collect(),
            Some(v) => v.as_u64().map(|x| vec![x as u32]).ok_or_else(|| bad(v)),
        }
    }
}

fn as_object<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>> {
    v.as_object().ok_or_else(|| Error::Config {
        field: what.to_string(),
        msg: "expected a JSON object".into(),
    })
}

fn parse_rope(f: &Fields<'_>, max_pos: usize) -> Result<RopeConfig> {
    // v5 keeps everything in `rope_parameters`; v4 has top-level `rope_theta` and `rope_scaling`.
    let (params, name) = match (f.present("rope_parameters"), f.present("rope_scaling")) {
        (Some(p), _) => (Some(as_object(p, "rope_parameters")?), "rope_parameters"),
        (None, Some(s)) => (Some(as_object(s, "rope_scaling")?), "rope_scaling"),
        (None, None) => (None, ""),
    };
    let empty = Map::new();
    let p = Fields(params.unwrap_or(&empty), name);
    let theta = p
        .opt_f64("rope_theta")?
        .or(f.opt_f64("rope_theta")?)
        .unwrap_or(10000.0);
    let partial_rotary_factor = p
        .opt_f64("partial_rotary_factor")?
        .or(f.opt_f64("partial_rotary_factor")?)
        .unwrap_or(1.0);
    let kind = p
        .opt_str("rope_type")?
        .or(p.opt_str("type")?)
        .unwrap_or("default");
    let factor = |required: bool| -> Result<Option<f64>> {
        match p.opt_f64("factor")? {
            Some(x) if x <= 0.0 => Err(p.err("factor", format!("must be positive, got {x}"))),
            None if required => Err(p.err("factor", "missing")),
            other => Ok(other),
        }
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: factor(true)?.unwrap_or(1.0),
        },
        "yarn" => {
            let original = p
                .opt_f64("original_max_position_embeddings")?
                .or(f.opt_f64("original_max_position_embeddings")?)
                .unwrap_or(max_pos as f64);
            let factor = factor(false)?.unwrap_or(max_pos as f64 / original);
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast: p.opt_f64("beta_fast")?.unwrap_or(32.0),
                beta_slow: p.opt_f64("beta_slow")?.unwrap_or(1.0),
                attention_factor: p.opt_f64("attention_factor")?,
                mscale: p.opt_f64("mscale")?,
                mscale_all_dim: p.opt_f64("mscale_all_dim")?,
                truncate: p.opt_bool("truncate")?.unwrap_or(true),
            }
        }
        other => {
            return Err(p.err(
                "rope_type",
                format!("unsupported RoPE type {other:?} (supported: default, linear, yarn)"),
            ));
        }
    };
    Ok(RopeConfig {
        theta,
        partial_rotary_factor,
        scaling,
    })
}

/// Each layer's sliding window (`None`: full attention), as transformers 5 builds it:
/// - `layer_types` when the config lists them (what transformers 5 saves): `"sliding_attention"`
///   layers get `sliding_window`, `"full_attention"` layers none; any other type is refused.
/// - Otherwise the architecture's rule from `sliding_window` (transformers 4 configs): Mixtral
///   windows every layer when `sliding_window` is set; Qwen3-MoE every layer when
///   `use_sliding_window` is also true; Qwen2-MoE, with `use_sliding_window`, the even-numbered
///   layers below `max_window_layers` (default 28) — transformers' `Qwen2MoeConfig` rule, unlike
///   dense Qwen2's "layers from `max_window_layers` on".
fn parse_layer_windows(
    f: &Fields<'_>,
    architecture: Architecture,
    num_layers: usize,
) -> Result<Vec<Option<usize>>> {
    let window = || -> Result<usize> {
        match f.opt_usize("sliding_window")? {
            Some(w) if w > 0 => Ok(w),
            _ => Err(f.err(
                "sliding_window",
                "must be a positive integer when a layer uses sliding-window attention",
            )),
        }
    };
    if let Some(types) = f.present("layer_types") {
        let Value::Array(types) = types else {
            return Err(f.err("layer_types", format!("expected a list, got {types}")));
        };
        if types.len() != num_layers {
            return Err(f.err(
                "layer_types",
                format!("{} entries for {num_layers} layers", types.len()),
            ));
        }
        return types
            .iter()
            .enumerate()
            .map(|(l, t)| match t.as_str() {
                Some("full_attention") => Ok(None),
                Some("sliding_attention") => window().map(Some),
                _ => Err(f.err(
                    "layer_types",
                    format!(
                        "layer {l} is {t}; supported: \"full_attention\", \"sliding_attention\""
                    ),
                )),
            })
            .collect();
    }
    let enabled = match architecture {
        Architecture::Mixtral => f.opt_usize("sliding_window")?.is_some_and(|w| w > 0),
        Architecture::Qwen3Moe | Architecture::Qwen2Moe => {
            f.opt_bool("use_sliding_window")?.unwrap_or(false)
        }
    };
    if !enabled {
        return Ok(vec![None; num_layers]);
    }
    let w = window()?;
    Ok(match architecture {
        Architecture::Qwen2Moe => {
            let below = f.opt_usize("max_window_layers")?.unwrap_or(28);
            (0..num_layers)
                .map(|l| (l % 2 == 0 && l < below).then_some(w))
                .collect()
        }
        Architecture::Mixtral | Architecture::Qwen3Moe => vec![Some(w); num_layers],
    })
}

impl ModelConfig {
    /// Layer `l`'s sliding window, `None` for full attention (or a layer beyond the model).
    pub fn window(&self, l: usize) -> Option<usize> {
        self.layer_windows.get(l).copied().flatten()
    }

    /// The narrowest sliding window of any layer (`None`: every layer attends fully). Up to
    /// that many tokens, every layer's attention is plain causal attention.
    pub fn min_window(&self) -> Option<usize> {
        self.layer_windows.iter().flatten().copied().min()
    }

    /// Reads and validates `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_json(&read_json(&dir.join("config.json"))?)
    }

    pub fn from_json(v: &Value) -> Result<Self> {
        let f = Fields(as_object(v, "config")?, "");
        let arch_name = match f.present("architectures") {
            Some(Value::Array(a)) if !a.is_empty() => a[0].as_str().unwrap_or_default().to_string(),
            _ => return Err(f.err("architectures", "missing or empty")),
        };
        let architecture = Architecture::from_name(&arch_name)?;
        let hidden_size = f.usize("hidden_size")?;
        let num_heads = f.usize("num_attention_heads")?;
        let num_kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        let num_layers = f.usize("num_hidden_layers")?;
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(f.err(
                "num_key_value_heads",
                format!("{num_heads} attention heads must be a positive multiple of {num_kv_heads} key/value heads"),
            ));
        }
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => return Err(f.err(
                "head_dim",
                format!(
                    "absent, and hidden_size {hidden_size} is not divisible by {num_heads} heads"
                ),
            )),
        };
        let max_position_embeddings = f.opt_usize("max_position_embeddings")?.unwrap_or(4096);
        let rope = parse_rope(&f, max_position_embeddings)?;
        let rotary = (head_dim as f64 * rope.partial_rotary_factor) as usize;
        if rotary == 0 || !rotary.is_multiple_of(2) || rotary > head_dim {
            return Err(f.err(
                "partial_rotary_factor",
                format!("gives rotary dim {rotary} for head_dim {head_dim}"),
            ));
        }
        if let Some(act) = f.opt_str("hidden_act")?
            && act != "silu"
        {
            return Err(f.err("hidden_act", format!("only silu is supported, got {act:?}")));
        }
        let dense_intermediate_size = f.opt_usize("intermediate_size")?.unwrap_or(0);
        let (moe, sparse_layers, qkv_bias, o_bias, qk_norm) = match architecture {
            Architecture::Mixtral => {
                let moe = MoeConfig {
                    num_experts: f.usize("num_local_experts")?,
                    top_k: f.usize("num_experts_per_tok")?,
                    expert_intermediate_size: f.usize("intermediate_size")?,
                    norm_topk_prob: true,
                    shared_expert_intermediate_size: None,
                };
                (moe, vec![true; num_layers], false, false, false)
            }
            Architecture::Qwen3Moe | Architecture::Qwen2Moe => {
                let num_experts = match (
                    f.opt_usize("num_experts")?,
                    f.opt_usize("num_local_experts")?,
                ) {
                    (Some(n), _) | (None, Some(n)) => n,
                    (None, None) => {
                        return Err(
                            f.err("num_experts", "missing (also looked for num_local_experts)")
                        );
                    }
                };
                let step = f.opt_usize("decoder_sparse_step")?.unwrap_or(1);
                if step == 0 {
                    return Err(f.err("decoder_sparse_step", "must be at least 1"));
                }
                let mlp_only: Vec<usize> = match f.present("mlp_only_layers") {
                    None => Vec::new(),
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|x| {
                            x.as_u64()
                                .map(|x| x as usize)
                                .ok_or_else(|| f.err("mlp_only_layers", format!("bad entry {x}")))
                        })
                        .collect::<Result<_>>()?,
                    Some(other) => {
                        return Err(
                            f.err("mlp_only_layers", format!("expected a list, got {other}"))
                        );
                    }
                };
                let sparse: Vec<bool> = (0..num_layers)
                    .map(|l| !mlp_only.contains(&l) && num_experts > 0 && (l + 1) % step == 0)
                    .collect();
                let is_qwen2 = architecture == Architecture::Qwen2Moe;
                let moe = MoeConfig {
                    num_experts,
                    top_k: f.usize("num_experts_per_tok")?,
                    expert_intermediate_size: f.usize("moe_intermediate_size")?,
                    norm_topk_prob: f.opt_bool("norm_topk_prob")?.unwrap_or(false),
                    shared_expert_intermediate_size: if is_qwen2 {
                        Some(f.usize("shared_expert_intermediate_size")?)
                    } else {
                        None
                    },
                };
                let attention_bias = f.opt_bool("attention_bias")?.unwrap_or(false);
                let (qkv_bias, o_bias) = if is_qwen2 {
                    (f.opt_bool("qkv_bias")?.unwrap_or(true), false)
                } else {
                    (attention_bias, attention_bias)
                };
                (moe, sparse, qkv_bias, o_bias, !is_qwen2)
            }
        };
        if moe.top_k == 0 || moe.top_k > moe.num_experts {
            return Err(f.err(
                "num_experts_per_tok",
                format!(
                    "{} must be between 1 and the {} experts",
                    moe.top_k, moe.num_experts
                ),
            ));
        }
        if sparse_layers.iter().any(|s| !s) && dense_intermediate_size == 0 {
            return Err(f.err(
                "intermediate_size",
                "dense MLP layers need a positive intermediate_size",
            ));
        }
        let cfg = Self {
            architecture,
            vocab_size: f.usize("vocab_size")?,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope,
            max_position_embeddings,
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            qk_norm,
            moe,
            dense_intermediate_size,
            sparse_layers,
            layer_windows: parse_layer_windows(&f, architecture, num_layers)?,
            bos_token_id: f.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: f.token_ids("eos_token_id")?,
        };
        for (name, v) in [
            ("vocab_size", cfg.vocab_size),
            ("hidden_size", cfg.hidden_size),
            ("num_hidden_layers", cfg.num_layers),
        ] {
            if v == 0 {
                return Err(f.err(name, "must be positive"));
            }
        }
        Ok(cfg)
    }
}

impl GenerationConfig {
    /// Reads `DIR/generation_config.json` when present; `None` when the file does not exist.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(None);
        }
        let v = read_json(&path)?;
        let f = Fields(as_object(&v, "generation_config")?, "generation_config");
        Ok(Some(Self {
            eos_token_ids: f.token_ids("eos_token_id")?,
            bos_token_id: f.token_ids("bos_token_id")?.first().copied(),
            temperature: f.opt_f64("temperature")?.map(|x| x as f32),
            top_p: f.opt_f64("top_p")?.map(|x| x as f32),
            do_sample: f.opt_bool("do_sample")?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn qwen3_base() -> Value {
        json!({
            "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 100, "hidden_size": 32,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 64, "moe_intermediate_size": 16, "num_experts_per_tok": 2,
            "decoder_sparse_step": 1, "mlp_only_layers": [2], "norm_topk_prob": true,
        })
    }

    #[test]
    fn transformers4_and_transformers5_styles_parse_the_same() {
        let mut v4 = qwen3_base();
        v4["num_experts"] = json!(8);
        v4["rope_theta"] = json!(1e6);
        v4["rope_scaling"] =
            json!({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096});
        let mut v5 = qwen3_base();
        v5["num_local_experts"] = json!(8);
        v5["head_dim"] = Value::Null;
        v5["rope_parameters"] = json!({"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096});
        let a = ModelConfig::from_json(&v4).unwrap();
        let b = ModelConfig::from_json(&v5).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.head_dim, 8);
        assert_eq!(a.moe.num_experts, 8);
        assert_eq!(a.sparse_layers, vec![true, true, false, true]);
        assert!(matches!(
            a.rope.scaling,
            RopeScaling::Yarn { factor: 4.0, .. }
        ));
    }

    #[test]
    fn per_layer_windows_from_layer_types_or_the_architecture_rule() {
        let qwen2 = |extra: Value| {
            let mut v = qwen3_base();
            v["architectures"] = json!(["Qwen2MoeForCausalLM"]);
            v["num_experts"] = json!(8);
            v["shared_expert_intermediate_size"] = json!(32);
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            ModelConfig::from_json(&v).map(|c| c.layer_windows)
        };
        // transformers 5 saves layer_types; they win over the rule.
        let w = qwen2(json!({"use_sliding_window": true, "sliding_window": 32,
            "max_window_layers": 1,
            "layer_types": ["full_attention", "sliding_attention", "full_attention", "full_attention"]}));
        assert_eq!(w.unwrap(), vec![None, Some(32), None, None]);
        // Qwen2-MoE's own rule: even layers below max_window_layers.
        let w = qwen2(
            json!({"use_sliding_window": true, "sliding_window": 32, "max_window_layers": 1}),
        );
        assert_eq!(w.unwrap(), vec![Some(32), None, None, None]);
        let w = qwen2(json!({"use_sliding_window": true, "sliding_window": 8}));
        assert_eq!(w.unwrap(), vec![Some(8), None, Some(8), None]);
        let w = qwen2(
            json!({"use_sliding_window": false, "sliding_window": 0, "layer_types": vec!["full_attention"; 4]}),
        );
        assert_eq!(w.unwrap(), vec![None; 4]);
        // Qwen3-MoE windows every layer, only with use_sliding_window.
        let mut v = qwen3_base();
        v["num_experts"] = json!(8);
        v["sliding_window"] = json!(16);
        assert_eq!(
            ModelConfig::from_json(&v).unwrap().layer_windows,
            vec![None; 4]
        );
        v["use_sliding_window"] = json!(true);
        let c = ModelConfig::from_json(&v).unwrap();
        assert_eq!(c.layer_windows, vec![Some(16); 4]);
        assert_eq!((c.window(3), c.window(4)), (Some(16), None));
        // Refusals name the field and what was wrong.
        let e = qwen2(json!({"layer_types": ["full_attention", "chunked_attention", "full_attention", "full_attention"]}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("layer_types") && e.contains("chunked_attention"),
            "{e}"
        );
        let e = qwen2(json!({"layer_types": ["full_attention"]}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 entries for 4 layers"), "{e}");
        let e = qwen2(json!({"use_sliding_window": true, "sliding_window": 0}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sliding_window"), "{e}");
    }

    #[test]
    fn errors_name_the_field() {
        let mut v = qwen3_base();
        v["num_experts"] = json!(8);
        v["num_key_value_heads"] = json!(3);
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");

        let mut v = qwen3_base();
        v["num_experts"] = json!(8);
        v["num_experts_per_tok"] = json!(9);
        assert!(
            ModelConfig::from_json(&v)
                .unwrap_err()
                .to_string()
                .contains("num_experts_per_tok")
        );

        let mut v = qwen3_base();
        v["architectures"] = json!(["LlamaForCausalLM"]);
        assert!(matches!(
            ModelConfig::from_json(&v),
            Err(Error::UnknownArchitecture { .. })
        ));

        let mut v = qwen3_base();
        v["num_experts"] = json!(8);
        v["hidden_size"] = json!("big");
        assert!(
            ModelConfig::from_json(&v)
                .unwrap_err()
                .to_string()
                .contains("hidden_size")
        );

        let mut v = qwen3_base();
        v["num_experts"] = json!(8);
        v["rope_parameters"] = json!({"rope_type": "dynamic", "factor": 2.0});
        assert!(
            ModelConfig::from_json(&v)
                .unwrap_err()
                .to_string()
                .contains("rope_type")
        );
    }
}
