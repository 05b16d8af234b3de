//! The row-wise half of each layer in pieces (`layers::PIECE_ROWS`), which keeps a long prompt's
//! temporaries bounded: the same results as one piece, and a long prompt in one forward equals
//! the same prompt fed in short forwards over the cache.

use anyhow::{Result, ensure};
use ringmoe_core::Cpu;
use ringmoe_core::testing::rand_vec;
use ringmoe_model::layers::{PIECE_ROWS, local_experts, piece_range, pieces_for};
use ringmoe_model::{LoadOptions, LogitsFor, Model};
use ringmoe_testkit::{ARCH_FIXTURES, fixture, max_abs_diff};

#[test]
fn piece_ranges_cover_the_rows_once_in_order() {
    for rows in [0usize, 1, 5, 4096, 4097, 1 << 20] {
        for max in [1usize, 3, 4096] {
            let n = pieces_for(rows, max);
            ensure_cover(rows, n);
            assert!((0..n).all(|i| {
                let (s, e) = piece_range(rows, n, i);
                e - s <= max
            }));
        }
        // More pieces than rows (a rank holding fewer tokens than the largest shard).
        ensure_cover(rows, rows + 3);
    }
    assert_eq!(pieces_for(1 << 20, PIECE_ROWS), (1 << 20) / PIECE_ROWS);
}

fn ensure_cover(rows: usize, n: usize) {
    let mut next = 0;
    for i in 0..n {
        let (s, e) = piece_range(rows, n, i);
        assert_eq!(s, next, "{rows} rows in {n} pieces: piece {i}");
        assert!(e >= s);
        next = e;
    }
    assert_eq!(next, rows);
}

/// Every layer of every fixture: the rest of the layer in 7 pieces equals it in one piece (the
/// same hidden rows within float noise, the same routing).
#[test]
fn a_layer_finished_in_pieces_equals_one_piece_on_every_fixture() -> Result<()> {
    for name in ARCH_FIXTURES {
        let model = Model::load(&fixture(name), &LoadOptions::default())?;
        let vocab = model.config.vocab_size as f32;
        let ids: Vec<u32> = rand_vec(61, 11, 1.0)
            .into_iter()
            .map(|u| ((u * 0.5 + 0.5) * (vocab - 1.0)) as u32)
            .collect();
        let positions: Vec<usize> = (0..ids.len()).collect();
        let mut x = model.embed(&ids)?;
        let mut cache = model.new_cache();
        for (l, (layer, kv)) in model
            .layers()
            .iter()
            .zip(cache.layers.iter_mut())
            .enumerate()
        {
            let rope = layer.attn.rope.table(&positions);
            let qkv = layer.qkv(&Cpu, &x, &rope)?;
            kv.append(qkv.k.as_slice(), qkv.v.as_slice(), &positions);
            let out = layer.attn.attend(&Cpu, &qkv.q, &positions, kv)?.out;
            let mut local =
                |m: &_, x: &_, r: &_| local_experts::<Cpu, ringmoe_model::Error>(&Cpu, m, x, r);
            let mut one = x.clone();
            let r1 = layer.finish_in(&Cpu, &mut one, &out, 1, &mut local)?;
            let mut seven = x.clone();
            let r7 = layer.finish_in(&Cpu, &mut seven, &out, 7, &mut local)?;
            let d = max_abs_diff(one.as_slice(), seven.as_slice());
            // The GEMMs sum in another order for other row counts: float noise only.
            ensure!(d <= 1e-5, "{name} layer {l}: 7 pieces vs 1: max |Δ| {d}");
            ensure!(
                r1.as_ref().map(|r| &r.expert_ids) == r7.as_ref().map(|r| &r.expert_ids),
                "{name} layer {l}: routing differs"
            );
            x = one;
        }
    }
    Ok(())
}

/// A prompt of more than two pieces in one forward (the needle model: a sliding-window layer and
/// a full one) equals the same prompt fed 1000 tokens at a time over the cache.
#[test]
fn a_long_prompt_in_pieces_equals_short_forwards_over_the_cache() -> Result<()> {
    let model = Model::load(&fixture("needle-moe"), &LoadOptions::default())?;
    let len = 2 * PIECE_ROWS + 808;
    let ids: Vec<u32> = rand_vec(len, 5, 1.0)
        .into_iter()
        .map(|u| 64 + ((u * 0.5 + 0.5) * 191.0) as u32)
        .collect();
    let whole = model
        .forward(&ids, &mut model.new_cache(), LogitsFor::All)?
        .logits
        .into_vec();
    let mut cache = model.new_cache();
    let mut parts = Vec::with_capacity(whole.len());
    for chunk in ids.chunks(1000) {
        parts.extend(
            model
                .forward(chunk, &mut cache, LogitsFor::All)?
                .logits
                .into_vec(),
        );
    }
    let d = max_abs_diff(&whole, &parts);
    ensure!(d <= 1e-4, "one forward vs forwards of 1000: max |Δ| {d}");
    Ok(())
}
