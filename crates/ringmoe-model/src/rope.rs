//! RoPE inverse frequencies from the config, computed as transformers' `modeling_rope_utils` does
//! for the `default`, `linear` and `yarn` types. The rotation itself is `ringmoe_core::rope`.

use ringmoe_core::rope::RopeFreqs;

use crate::config::{RopeConfig, RopeScaling};

/// Frequencies for a head of `head_dim` under `cfg`.
///
/// The arithmetic is f32 in transformers' order (`base ** (arange(0, dim, 2) / dim)`, then the
/// reciprocal), so that angles at large positions agree with the reference to the last bit.
pub fn rope_freqs(cfg: &RopeConfig, head_dim: usize) -> RopeFreqs {
    let dim = (head_dim as f64 * cfg.partial_rotary_factor) as usize;
    let base = cfg.theta as f32;
    let pos_freqs: Vec<f32> = (0..dim / 2)
        .map(|i| base.powf((2 * i) as f32 / dim as f32))
        .collect();
    let (inv_freq, attention_scaling) = match &cfg.scaling {
        RopeScaling::Default => (pos_freqs.iter().map(|p| 1.0 / p).collect(), 1.0),
        RopeScaling::Linear { factor } => (
            pos_freqs
                .iter()
                .map(|p| (1.0 / p) / *factor as f32)
                .collect(),
            1.0,
        ),
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            attention_factor,
            mscale,
            mscale_all_dim,
            truncate,
        } => {
            let get_mscale = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            let attention = attention_factor.unwrap_or_else(|| match (mscale, mscale_all_dim) {
                (Some(m), Some(ma)) if *m != 0.0 && *ma != 0.0 => {
                    get_mscale(*factor, *m) / get_mscale(*factor, *ma)
                }
                _ => get_mscale(*factor, 1.0),
            });
            let correction_dim = |rotations: f64| {
                (dim as f64
                    * (original_max_position_embeddings / (rotations * 2.0 * std::f64::consts::PI))
                        .ln())
                    / (2.0 * cfg.theta.ln())
            };
            let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
            if *truncate {
                low = low.floor();
                high = high.ceil();
            }
            let (low, mut high) = (low.max(0.0) as f32, high.min(dim as f64 - 1.0) as f32);
            if low == high {
                high += 0.001;
            }
            let factor = *factor as f32;
            let inv = pos_freqs
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolation = 1.0 - ramp;
                    (1.0 / (factor * p)) * (1.0 - extrapolation) + (1.0 / p) * extrapolation
                })
                .collect();
            (inv, attention)
        }
    };
    RopeFreqs {
        inv_freq,
        attention_scaling: attention_scaling as f32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_divides_default_and_yarn_keeps_high_frequencies() {
        let default = RopeConfig {
            theta: 10000.0,
            partial_rotary_factor: 1.0,
            scaling: RopeScaling::Default,
        };
        let d = rope_freqs(&default, 64);
        let lin = rope_freqs(
            &RopeConfig {
                scaling: RopeScaling::Linear { factor: 4.0 },
                ..default.clone()
            },
            64,
        );
        for (a, b) in d.inv_freq.iter().zip(&lin.inv_freq) {
            assert!((a / 4.0 - b).abs() <= 1e-7 * a.abs());
        }
        let yarn = rope_freqs(
            &RopeConfig {
                scaling: RopeScaling::Yarn {
                    factor: 4.0,
                    original_max_position_embeddings: 256.0,
                    beta_fast: 32.0,
                    beta_slow: 1.0,
                    attention_factor: None,
                    mscale: None,
                    mscale_all_dim: None,
                    truncate: true,
                },
                ..default
            },
            64,
        );
        // Highest frequency extrapolated (unchanged), lowest interpolated (divided by factor).
        assert_eq!(yarn.inv_freq[0], d.inv_freq[0]);
        assert!((yarn.inv_freq[31] - d.inv_freq[31] / 4.0).abs() <= 1e-6 * d.inv_freq[31]);
        assert!((yarn.attention_scaling - (0.1 * 4f32.ln() + 1.0)).abs() < 1e-6);
    }
}
