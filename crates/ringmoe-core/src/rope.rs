//! Rotary position embeddings applied by absolute position, in the "rotate half" layout that
//! Hugging Face Llama-family models (Mixtral, Qwen2/3-MoE) use.
//!
//! The frequencies come from the model config (see `ringmoe-model`'s rope module); this kernel only
//! rotates. Positions are absolute so a sequence shard rotates exactly as the full sequence would.

use rayon::prelude::*;

use crate::{Error, Result};

/// Inverse frequencies for the rotated part of a head plus the cos/sin scale (YaRN's mscale).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeFreqs {
    /// `rotary_dim / 2` inverse frequencies.
    pub inv_freq: Vec<f32>,
    /// Multiplies cos and sin (1.0 except for YaRN / LongRoPE).
    pub attention_scaling: f32,
}

impl RopeFreqs {
    /// cos and sin tables `[positions.len(), rotary_dim / 2]`, computed as transformers does:
    /// the angle `pos · inv_freq` rounded to f32, then its cosine, then the scaling.
    pub fn cos_sin(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32 * self.attention_scaling);
                sin.push(angle.sin() as f32 * self.attention_scaling);
            }
        }
        (cos, sin)
    }
}

/// Rotates `x` laid out `[tokens, heads, head_dim]` in place for the given absolute positions.
/// Only the first `2 · inv_freq.len()` dimensions of each head rotate (partial rotary).
pub fn apply_rope(
    x: &mut [f32],
    heads: usize,
    head_dim: usize,
    positions: &[usize],
    freqs: &RopeFreqs,
) -> Result<()> {
    let half = freqs.inv_freq.len();
    if 2 * half > head_dim || x.len() != positions.len() * heads * head_dim {
        return Err(Error::InvalidArgument {
            op: "apply_rope",
            msg: format!(
                "x has {} elements, positions {}, heads {heads}, head_dim {head_dim}, rotary dim {}",
                x.len(),
                positions.len(),
                2 * half
            ),
        });
    }
    if x.is_empty() {
        return Ok(());
    }
    let (cos, sin) = freqs.cos_sin(positions);
    x.par_chunks_mut(heads * head_dim)
        .enumerate()
        .for_each(|(t, tok)| {
            let c = &cos[t * half..(t + 1) * half];
            let s = &sin[t * half..(t + 1) * half];
            for head in tok.chunks_mut(head_dim) {
                let (a, b) = head[..2 * half].split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * c[i] - x2 * s[i];
                    b[i] = x2 * c[i] + x1 * s[i];
                }
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_preserves_norm_and_position_zero_is_identity() {
        let freqs = RopeFreqs {
            inv_freq: vec![1.0, 0.1],
            attention_scaling: 1.0,
        };
        let orig = vec![0.3f32, -1.2, 0.7, 2.0, 1.0, 1.0, 1.0, 1.0];
        let mut x = orig.clone();
        apply_rope(&mut x, 1, 4, &[0, 5], &freqs).unwrap();
        assert_eq!(&x[..4], &orig[..4]);
        let n0: f32 = orig[4..].iter().map(|v| v * v).sum();
        let n1: f32 = x[4..].iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-5);
    }

    #[test]
    fn relative_property_dot_product_depends_on_offset_only() {
        let freqs = RopeFreqs {
            inv_freq: vec![0.5, 0.05],
            attention_scaling: 1.0,
        };
        let q = [0.3f32, -1.2, 0.7, 2.0];
        let k = [1.1f32, 0.4, -0.6, 0.9];
        let dot_at = |pq: usize, pk: usize| {
            let (mut a, mut b) = (q.to_vec(), k.to_vec());
            apply_rope(&mut a, 1, 4, &[pq], &freqs).unwrap();
            apply_rope(&mut b, 1, 4, &[pk], &freqs).unwrap();
            a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()
        };
        assert!((dot_at(10, 3) - dot_at(107, 100)).abs() < 1e-4);
    }
}
