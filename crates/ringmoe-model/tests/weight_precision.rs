//! `--weights`: matrices held as f32, native (as stored), bf16 or q8 on the committed fixtures.
//! Native must not change an f32 fixture's logits at all and must equal the f32 upcast of the bf16
//! fixture within 1e-5; q8 is reported as a quality figure with only a loose sanity bound.

use anyhow::{Result, ensure};
use ringmoe_core::WeightPrecision;
use ringmoe_model::{Checkpoint, LoadOptions, LogitsFor, Model, nll_of};
use ringmoe_testkit::{fixture, max_abs_diff};

use ringmoe_testkit::MODEL_FIXTURES as FIXTURES;

fn load(name: &str, weights: WeightPrecision) -> Result<Model> {
    let opts = LoadOptions {
        weights,
        ..LoadOptions::default()
    };
    Ok(Model::load(&fixture(name), &opts)?)
}

fn ids(name: &str, len: usize) -> Result<Vec<u32>> {
    let dir = fixture(name);
    let r = Checkpoint::open_files(&dir, &[dir.join("reference.safetensors")])?;
    Ok(r.load_i64(&format!("input_ids_L{len}"))?
        .0
        .into_iter()
        .map(|x| x as u32)
        .collect())
}

/// Logits of the prompt in one prefill, then of 8 more tokens decoded one at a time (the GEMV
/// path), concatenated.
fn prefill_and_decode(m: &Model, ids: &[u32]) -> Result<Vec<f32>> {
    let mut cache = m.new_cache();
    let (prompt, rest) = ids.split_at(ids.len() - 8);
    let mut out = m
        .forward(prompt, &mut cache, LogitsFor::All)?
        .logits
        .into_vec();
    for &t in rest {
        out.extend(
            m.forward(&[t], &mut cache, LogitsFor::Last)?
                .logits
                .into_vec(),
        );
    }
    Ok(out)
}

#[test]
fn native_weights_keep_the_f32_logits_and_the_bf16_upcast() -> Result<()> {
    for name in FIXTURES {
        let f32_model = load(name, WeightPrecision::F32)?;
        let native = load(name, WeightPrecision::Native)?;
        let bf16_fixture = name.ends_with("bf16");
        ensure!(
            (native.weight_bytes() < f32_model.weight_bytes()) == bf16_fixture,
            "{name}: native holds {} bytes, f32 {}",
            native.weight_bytes(),
            f32_model.weight_bytes()
        );
        for len in [64, 300] {
            let ids = ids(name, len)?;
            let want = prefill_and_decode(&f32_model, &ids)?;
            let got = prefill_and_decode(&native, &ids)?;
            let d = max_abs_diff(&got, &want);
            if bf16_fixture {
                ensure!(
                    d <= 1e-5,
                    "{name} L={len}: native vs f32 upcast max |Δ| {d:e}"
                );
            } else {
                ensure!(
                    d == 0.0,
                    "{name} L={len}: native changed f32 logits by {d:e}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn q8_and_bf16_quality_against_f32() -> Result<()> {
    for name in FIXTURES {
        let reference = load(name, WeightPrecision::F32)?;
        let ids = ids(name, 300)?;
        let want = reference.forward(&ids, &mut reference.new_cache(), LogitsFor::All)?;
        let vocab = reference.config.vocab_size;
        let nll = |logits: &[f32]| -> f64 {
            let rows: Vec<&[f32]> = logits.chunks(vocab).collect();
            (0..ids.len() - 1)
                .map(|i| nll_of(rows[i], ids[i + 1] as usize) as f64)
                .sum::<f64>()
                / (ids.len() - 1) as f64
        };
        let top1 = |logits: &[f32]| -> Vec<usize> {
            logits
                .chunks(vocab)
                .map(|r| {
                    r.iter()
                        .enumerate()
                        .fold(
                            (0, f32::NEG_INFINITY),
                            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                        )
                        .0
                })
                .collect()
        };
        let (want_nll, want_top) = (nll(want.logits.as_slice()), top1(want.logits.as_slice()));
        for p in [WeightPrecision::BF16, WeightPrecision::Q8] {
            let m = load(name, p)?;
            let got = m.forward(&ids, &mut m.new_cache(), LogitsFor::All)?;
            let d = max_abs_diff(got.logits.as_slice(), want.logits.as_slice());
            let agree = top1(got.logits.as_slice())
                .iter()
                .zip(&want_top)
                .filter(|(a, b)| a == b)
                .count() as f64
                / want_top.len() as f64;
            let dnll = nll(got.logits.as_slice()) - want_nll;
            eprintln!(
                "{name} {p} vs f32, L=300: max |Δlogit| {d:.4}, top-1 agreement {:.1}%, mean NLL {:+.5} (f32 {want_nll:.4}), {:.3} bytes/f32 byte",
                100.0 * agree,
                dnll,
                m.weight_bytes() as f64 / reference.weight_bytes() as f64
            );
            // Loose sanity bounds: a broken kernel gives garbage, not a small shift.
            ensure!(agree >= 0.8, "{name} {p}: top-1 agreement {agree}");
            ensure!(dnll.abs() < 0.05, "{name} {p}: NLL moved by {dnll}");
        }
    }
    Ok(())
}
