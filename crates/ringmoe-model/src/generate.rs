//! Sampling (greedy, seeded temperature + top-p) and the generation loop: prefill the prompt,
//! then decode one token at a time over the KV cache, stopping on EOS or the token budget.

use std::time::Instant;

use crate::model::{LogitsFor, Model};
use crate::{Error, Result};

/// Sampling settings. `temperature == 0` is greedy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// A small, seedable generator (SplitMix64): the same seed gives the same tokens on any machine.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    state: u64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        if !(params.temperature >= 0.0 && params.temperature.is_finite()) {
            return Err(Error::InvalidInput(format!(
                "temperature must be finite and ≥ 0, got {}",
                params.temperature
            )));
        }
        if !(params.top_p > 0.0 && params.top_p <= 1.0) {
            return Err(Error::InvalidInput(format!(
                "top_p must be in (0, 1], got {}",
                params.top_p
            )));
        }
        Ok(Self {
            params,
            state: params.seed,
        })
    }

    fn next_f64(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Picks the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let argmax = || {
            logits
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |b, (i, &v)| {
                    if v > b.1 { (i, v) } else { b }
                })
                .0 as u32
        };
        if self.params.temperature == 0.0 {
            return argmax();
        }
        let t = self.params.temperature as f64;
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut probs: Vec<(usize, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i, ((l as f64 - m) / t).exp()))
            .collect();
        let z: f64 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= z);
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        // Nucleus: the smallest prefix whose mass reaches top_p (always at least one token).
        let mut mass = 0.0;
        let mut keep = 0;
        for p in &probs {
            mass += p.1;
            keep += 1;
            if mass >= self.params.top_p as f64 {
                break;
            }
        }
        let r = self.next_f64() * mass;
        let mut acc = 0.0;
        for p in &probs[..keep] {
            acc += p.1;
            if r < acc {
                return p.0 as u32;
            }
        }
        probs[keep - 1].0 as u32
    }
}

/// Timings of one generation, as llama.cpp reports them.
#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

impl GenerationStats {
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }

    /// Decode rate over the tokens produced by decode steps (the first comes from prefill).
    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// Generates up to `max_new_tokens` after `prompt`, calling `on_token` for each new token as soon
/// as it exists. Stops after emitting a token in `eos` (which is included, as transformers does).
pub fn generate(
    model: &Model,
    prompt: &[u32],
    max_new_tokens: usize,
    sampler: &mut Sampler,
    eos: &[u32],
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, GenerationStats)> {
    if prompt.is_empty() {
        return Err(Error::InvalidInput("the prompt has no tokens".into()));
    }
    let mut stats = GenerationStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    let mut out = Vec::new();
    if max_new_tokens == 0 {
        return Ok((out, stats));
    }
    let mut cache = model.new_cache();
    let t0 = Instant::now();
    let first = model.forward(prompt, &mut cache, LogitsFor::Last)?;
    let mut next = sampler.sample(first.logits.as_slice());
    stats.prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    loop {
        out.push(next);
        on_token(next)?;
        if eos.contains(&next) || out.len() >= max_new_tokens {
            break;
        }
        let step = model.forward(&[next], &mut cache, LogitsFor::Last)?;
        next = sampler.sample(step.logits.as_slice());
    }
    stats.decode_secs = t1.elapsed().as_secs_f64();
    stats.generated_tokens = out.len();
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_seeded_sampling_repeats() {
        let logits = [0.1f32, 3.0, 2.9, -1.0];
        assert_eq!(
            Sampler::new(SamplingParams::default())
                .unwrap()
                .sample(&logits),
            1
        );
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            seed: 7,
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p).unwrap();
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p).unwrap();
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        assert!(a.contains(&1) && a.contains(&2));
        // top_p small enough keeps only the most likely token.
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.01,
            seed: 3,
        })
        .unwrap();
        assert!((0..20).all(|_| s.sample(&logits) == 1));
    }

    #[test]
    fn bad_sampling_params_are_errors() {
        assert!(
            Sampler::new(SamplingParams {
                temperature: -1.0,
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            Sampler::new(SamplingParams {
                top_p: 0.0,
                ..Default::default()
            })
            .is_err()
        );
    }
}
