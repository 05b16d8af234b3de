//! What `gpu-check` reports (the same types with and without the `cuda` feature).

/// One comparison: the largest error relative to the reference's largest magnitude.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub rel_err: f64,
    pub tolerance: f64,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.rel_err <= self.tolerance
    }
}

/// Attention throughput at one shape.
#[derive(Debug, Clone)]
pub struct AttentionTiming {
    pub tokens: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub secs: f64,
    /// Causal FLOPs (4·L²·H·D / 2) per second, in units of 10¹².
    pub tflops: f64,
}

/// Throughput of a whole model on one GPU at one length.
#[derive(Debug, Clone)]
pub struct ModelTiming {
    pub precision: crate::Precision,
    pub tokens: usize,
    /// Prefill (logits for the last position), seconds and tokens/s.
    pub prefill_secs: f64,
    pub prefill_tokens_per_sec: f64,
    /// One sparse layer's MoE block (router, routed experts, combine) on `tokens` rows.
    pub moe_secs: f64,
    pub moe_tokens_per_sec: f64,
}
