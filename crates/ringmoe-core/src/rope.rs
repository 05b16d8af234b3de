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

/// cos and sin of every (position, frequency) pair of a batch of tokens, computed once per
/// forward and shared by q, k and every layer.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeTable {
    /// `[positions, rotary_dim / 2]`.
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
    pub positions: usize,
}

impl RopeFreqs {
    /// The table for `positions`, computed as transformers does: the angle `pos · inv_freq`
    /// rounded to f32, then its cosine (here in f64, correctly rounded), then the scaling.
    pub fn table(&self, positions: &[usize]) -> RopeTable {
        let half = self.inv_freq.len();
        let mut cos = vec![0f32; positions.len() * half];
        let mut sin = vec![0f32; positions.len() * half];
        cos.par_chunks_mut(half.max(1))
            .zip(sin.par_chunks_mut(half.max(1)))
            .zip(positions.par_iter())
            .for_each(|((c, s), &p)| {
                for ((c, s), &f) in c.iter_mut().zip(s.iter_mut()).zip(&self.inv_freq) {
                    let angle = (p as f32 * f) as f64;
                    *c = angle.cos() as f32 * self.attention_scaling;
                    *s = angle.sin() as f32 * self.attention_scaling;
                }
            });
        RopeTable {
            cos,
            sin,
            half,
            positions: positions.len(),
        }
    }
}

/// Rotates `x` laid out `[tokens, heads, head_dim]` in place with a table for its tokens' absolute
/// positions. Only the first `2 · table.half` dimensions of each head rotate (partial rotary).
pub fn apply_rope(x: &mut [f32], heads: usize, head_dim: usize, table: &RopeTable) -> Result<()> {
    let half = table.half;
    if 2 * half > head_dim || x.len() != table.positions * heads * head_dim {
        return Err(Error::InvalidArgument {
            op: "apply_rope",
            msg: format!(
                "x has {} elements, positions {}, heads {heads}, head_dim {head_dim}, rotary dim {}",
                x.len(),
                table.positions,
                2 * half
            ),
        });
    }
    if x.is_empty() {
        return Ok(());
    }
    x.par_chunks_mut(heads * head_dim)
        .enumerate()
        .for_each(|(t, tok)| {
            let c = &table.cos[t * half..(t + 1) * half];
            let s = &table.sin[t * half..(t + 1) * half];
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
        apply_rope(&mut x, 1, 4, &freqs.table(&[0, 5])).unwrap();
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
            apply_rope(&mut a, 1, 4, &freqs.table(&[pq])).unwrap();
            apply_rope(&mut b, 1, 4, &freqs.table(&[pk])).unwrap();
            a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()
        };
        assert!((dot_at(10, 3) - dot_at(107, 100)).abs() < 1e-4);
    }
}
