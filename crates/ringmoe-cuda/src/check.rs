//! `ringmoe gpu-check`: every CUDA kernel against ringmoe-core's CPU kernel on random inputs,
//! with explicit tolerances, and the attention kernel's throughput on given shapes.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ringmoe_core::attention::merge_into;
use ringmoe_core::ops::{rms_norm, softmax_inplace, swiglu_fused, top_k};
use ringmoe_core::rope::{RopeFreqs, apply_rope};
use ringmoe_core::testing::rand_vec;
use ringmoe_core::{AttentionParams, Tensor, attention_block};
use ringmoe_model::{Checkpoint, ExpertSelection, LogitsFor, ModelConfig, TensorSource, moe};

pub use crate::report::{AttentionTiming, Check, ModelTiming};
use crate::{CudaBackend, Precision, Result};
use ringmoe_comm::nccl::NcclCommunicator;

/// `max |a − b| / max |b|`.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30) as f64;
    got.iter()
        .zip(want)
        .map(|(a, b)| {
            if a.is_infinite() && b.is_infinite() && a.signum() == b.signum() {
                0.0
            } else {
                (a - b).abs() as f64
            }
        })
        .fold(
            if got.len() == want.len() {
                0.0
            } else {
                f64::INFINITY
            },
            f64::max,
        )
        / scale
}

fn tensor(n: &[usize], seed: u64, amp: f32) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        rand_vec(n.iter().product(), seed, amp),
        n.to_vec(),
    )?)
}

/// Causal attention with the usual 1/√d scale.
fn causal(heads: usize, kv_heads: usize, head_dim: usize) -> AttentionParams {
    AttentionParams {
        n_heads: heads,
        n_kv_heads: kv_heads,
        head_dim,
        scale: 1.0 / (head_dim as f32).sqrt(),
        causal: true,
    }
}

/// Runs every kernel check on `b`.
pub fn kernels(b: &CudaBackend) -> Result<Vec<Check>> {
    let mut out = Vec::new();
    let mut push = |name: &str, got: &[f32], want: &[f32], tolerance: f64| {
        out.push(Check {
            name: name.to_string(),
            rel_err: rel_err(got, want),
            tolerance,
        });
    };

    // GEMMs: f32 (cuBLAS may use TF32 only when asked; it is not), and bf16 in / f32 out.
    let (m, k, n) = (300, 512, 384);
    let x = tensor(&[m, k], 1, 1.0)?;
    let w = tensor(&[n, k], 2, 0.05)?;
    let want = ringmoe_core::gemm::matmul_nt(
        x.as_slice(),
        m,
        k,
        w.as_slice(),
        n,
        ringmoe_core::gemm::Par::Rayon,
    )?;
    let dx = b.upload(&x)?;
    for (name, precision, tol) in [
        ("matmul f32", Precision::F32, 1e-4),
        ("matmul bf16→f32", Precision::Bf16, 1e-2),
    ] {
        let dw = b.upload_weight(w.as_slice(), n, k, precision)?;
        push(
            name,
            b.download(&b.linear(&dx, &dw)?)?.as_slice(),
            &want,
            tol,
        );
    }

    // Grouped GEMM over 8 experts with uneven (and one empty) row counts.
    let rows = [40usize, 0, 7, 100, 1, 33, 64, 55];
    let total: usize = rows.iter().sum();
    let xs = tensor(&[total, k], 3, 1.0)?;
    let ws: Vec<Tensor> = (0..rows.len())
        .map(|e| tensor(&[n, k], 10 + e as u64, 0.05))
        .collect::<Result<_>>()?;
    let mut want = Vec::with_capacity(total * n);
    let mut at = 0;
    for (e, &r) in rows.iter().enumerate() {
        let part = &xs.as_slice()[at * k..(at + r) * k];
        want.extend(ringmoe_core::gemm::matmul_nt(
            part,
            r,
            k,
            ws[e].as_slice(),
            n,
            ringmoe_core::gemm::Par::Rayon,
        )?);
        at += r;
    }
    let dxs = b.upload(&xs)?;
    for (name, precision, tol) in [
        ("grouped expert GEMM bf16", Precision::Bf16, 1.5e-2),
        ("grouped expert GEMM f32", Precision::F32, 1e-4),
    ] {
        let dws: Vec<_> = ws
            .iter()
            .map(|w| b.upload_weight(w.as_slice(), n, k, precision))
            .collect::<Result<_>>()?;
        let refs: Vec<_> = dws.iter().collect();
        let got = b.grouped_linear(&dxs, &rows, &refs)?;
        push(name, b.download(&got)?.as_slice(), &want, tol);
    }

    // The dispatch permutation and the combine of a random top-4 routing over 16 experts.
    let (tokens, hidden, experts, top) = (300, 256, 16, 4);
    let logits = rand_vec(tokens * experts, 40, 3.0);
    let routing = moe::route(&logits, experts, top, moe::TopKNorm::Renormalize)?;
    let plan = moe::plan(&routing, experts)?;
    let x = tensor(&[tokens, hidden], 41, 1.0)?;
    let token_of_row: Vec<usize> = (0..plan.slot_of_row.len())
        .map(|r| plan.token_of_row(r))
        .collect();
    let gathered = b.gather_rows(&b.upload(&x)?, &token_of_row)?;
    push(
        "gather rows (dispatch permutation)",
        b.download(&gathered)?.as_slice(),
        &moe::gather_rows(x.as_slice(), hidden, &plan),
        0.0,
    );
    let y = tensor(&[tokens * top, hidden], 42, 1.0)?;
    let want = moe::combine(y.as_slice(), hidden, &plan, &routing)?;
    let (rows_of, ws_of) = moe::combine_plan(&routing, |s| plan.row_of_slot[s] as usize);
    let got = b.combine(&b.upload(&y)?, &rows_of, &ws_of, top)?;
    push("MoE combine", b.download(&got)?.as_slice(), &want, 1e-5);

    // RMSNorm.
    let x = tensor(&[257, 1000], 4, 3.0)?;
    let wn: Vec<f32> = rand_vec(1000, 5, 1.0);
    let want = rms_norm(&x, &wn, 1e-6)?;
    let got = b.rms_norm(
        &b.upload(&x)?,
        &b.upload(&Tensor::from_vec(wn, vec![1000])?)?,
        1e-6,
    )?;
    push(
        "rms_norm",
        b.download(&got)?.as_slice(),
        want.as_slice(),
        1e-5,
    );

    // RoPE, partial rotary, at scattered absolute positions.
    let (tokens, heads, hd) = (97, 4, 64);
    let freqs = RopeFreqs {
        inv_freq: (0..24).map(|i| 10000f32.powf(-(i as f32) / 24.0)).collect(),
        attention_scaling: 1.0,
    };
    let positions: Vec<usize> = (0..tokens).map(|i| i * 37 + 5000).collect();
    let table = freqs.table(&positions);
    let x = tensor(&[tokens, heads, hd], 6, 1.0)?;
    let mut want = x.as_slice().to_vec();
    apply_rope(&mut want, heads, hd, &table)?;
    let mut dx = b.upload(&x)?;
    b.rope(&mut dx, heads, hd, &table)?;
    push("rope", b.download(&dx)?.as_slice(), &want, 1e-5);

    // SwiGLU.
    let gu = tensor(&[129, 2 * 700], 7, 4.0)?;
    let want = swiglu_fused(gu.as_slice(), 129, 700)?;
    push(
        "swiglu",
        b.download(&b.swiglu(&b.upload(&gu)?)?)?.as_slice(),
        &want,
        1e-5,
    );

    // Router softmax + top-k (renormalised, as Mixtral): weights, and ids exactly.
    let (r, e, kk) = (513, 64, 6);
    let logits = tensor(&[r, e], 8, 3.0)?;
    let (gw, gid) = b.router_topk(&b.upload(&logits)?, kk, true)?;
    let (mut ww, mut wid) = (Vec::new(), Vec::new());
    for row in logits.as_slice().chunks(e) {
        let mut p = row.to_vec();
        softmax_inplace(&mut p);
        let ids = top_k(&p, kk);
        let s: f32 = ids.iter().map(|&i| p[i]).sum();
        ww.extend(ids.iter().map(|&i| p[i] / s));
        wid.extend(ids.iter().map(|&i| i as f32));
    }
    push("router top-k weights", &gw, &ww, 1e-5);
    let gid: Vec<f32> = gid.iter().map(|&i| i as f32).collect();
    push("router top-k ids", &gid, &wid, 0.0);

    // Attention: GQA, causal by absolute (zigzag-like, unsorted) positions, against
    // attention_block; out and lse.
    for (lq, lk, h, hkv, d, causal) in [
        (200, 333, 8, 2, 128, true),
        (64, 64, 4, 4, 64, false),
        (37, 500, 6, 3, 96, true),
    ] {
        let p = AttentionParams {
            n_heads: h,
            n_kv_heads: hkv,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
            causal,
        };
        let kpos: Vec<usize> = (0..lk).map(|i| (i * 7919) % (lk + 50)).collect();
        let qpos: Vec<usize> = (0..lq).map(|i| (i * 104729) % (lk + 50)).collect();
        let q = tensor(&[lq, h, d], 20, 1.0)?;
        let kt = tensor(&[lk, hkv, d], 21, 1.0)?;
        let vt = tensor(&[lk, hkv, d], 22, 1.0)?;
        let want = attention_block(&p, q.as_slice(), &qpos, kt.as_slice(), vt.as_slice(), &kpos)?;
        let (o, l) = b.attention(
            &p,
            &b.upload(&q)?,
            &qpos,
            &b.upload(&kt)?,
            &b.upload(&vt)?,
            &kpos,
        )?;
        let tag = format!(
            "attention {lq}×{lk} h{h}/{hkv} d{d}{}",
            if causal { " causal" } else { "" }
        );
        push(
            &format!("{tag} out"),
            b.download(&o)?.as_slice(),
            &want.out,
            1e-4,
        );
        push(
            &format!("{tag} lse"),
            b.download(&l)?.as_slice(),
            &want.lse,
            1e-5,
        );
    }

    // The ring-attention step: two key blocks attended separately and merged, against the
    // CPU's merge of the same two partials.
    let p = AttentionParams {
        n_heads: 8,
        n_kv_heads: 2,
        head_dim: 64,
        scale: 0.125,
        causal: true,
    };
    let (lq, lk) = (120, 150);
    let qpos: Vec<usize> = (0..lq).map(|i| i * 2 + 30).collect();
    let kpos: Vec<usize> = (0..2 * lk).collect();
    let q = tensor(&[lq, 8, 64], 50, 1.0)?;
    let kt = tensor(&[2 * lk, 2, 64], 51, 1.0)?;
    let vt = tensor(&[2 * lk, 2, 64], 52, 1.0)?;
    let half = lk * 2 * 64;
    let (k0, k1) = kt.as_slice().split_at(half);
    let (v0, v1) = vt.as_slice().split_at(half);
    let mut want = attention_block(&p, q.as_slice(), &qpos, k0, v0, &kpos[..lk])?;
    merge_into(
        &mut want,
        &attention_block(&p, q.as_slice(), &qpos, k1, v1, &kpos[lk..])?,
    )?;
    let dq = b.upload(&q)?;
    let up = |v: &[f32]| b.upload(&Tensor::from_vec(v.to_vec(), vec![lk, 2, 64])?);
    let (mut o, mut l) = b.attention(&p, &dq, &qpos, &up(k0)?, &up(v0)?, &kpos[..lk])?;
    let (o1, l1) = b.attention(&p, &dq, &qpos, &up(k1)?, &up(v1)?, &kpos[lk..])?;
    b.merge_attention(&mut o, &mut l, &o1, &l1)?;
    push(
        "attention merge (ring step) out",
        b.download(&o)?.as_slice(),
        &want.out,
        1e-4,
    );
    push(
        "attention merge (ring step) lse",
        b.download(&l)?.as_slice(),
        &want.lse,
        1e-5,
    );
    Ok(out)
}

/// Ring attention over NCCL with `plan.world()` ranks as threads, rank `r` on GPU `r` (a single
/// GPU runs P = 1; NCCL cannot put two ranks on one GPU), through the generic ring
/// (`ringmoe_parallel::ring_attention_on`): rank `r` holds the queries and K/V at positions
/// `plan.positions(r)` of a random causal sequence. Each rank's `(out, lse)` is checked against
/// the CPU's attention of its queries over the whole sequence; also returns each rank's time
/// for one ring pass (after a warm-up).
pub fn ring_nccl(
    plan: &ringmoe_parallel::ShardPlan,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<(Vec<Check>, Vec<f64>)> {
    let world = plan.world();
    let len = plan.len;
    let shards: Vec<Vec<usize>> = (0..world).map(|r| plan.positions(r).to_vec()).collect();
    let p = causal(heads, kv_heads, head_dim);
    let (qw, kw) = (heads * head_dim, kv_heads * head_dim);
    let q = rand_vec(len * qw, 70, 1.0);
    let k = rand_vec(len * kw, 71, 1.0);
    let v = rand_vec(len * kw, 72, 1.0);
    let all: Vec<usize> = (0..len).collect();
    let rows = |x: &[f32], w: usize, pos: &[usize], shape: Vec<usize>| -> Result<Tensor> {
        let mut out = Vec::with_capacity(pos.len() * w);
        for &i in pos {
            out.extend_from_slice(&x[i * w..(i + 1) * w]);
        }
        Ok(Tensor::from_vec(out, shape)?)
    };
    let results = on_gpu_ranks(world, |r, b, comm| {
        let pos = &shards[r];
        let n = pos.len();
        let dq = b.upload(&rows(&q, qw, pos, vec![n, qw])?)?;
        let dk = b.upload(&rows(&k, kw, pos, vec![n, kw])?)?;
        let dv = b.upload(&rows(&v, kw, pos, vec![n, kw])?)?;
        let tag = ringmoe_comm::Tag::new(0, 0, 0, ringmoe_comm::Kind::Ring);
        let dense = ringmoe_parallel::AttentionMode::Dense;
        let ring =
            |own| ringmoe_parallel::ring_attention_on(&**b, comm, plan, &p, &dense, &dq, own, tag);
        let own = ring((dk, dv))?.own;
        b.synchronize()?;
        let t = Instant::now();
        let part = ring(own)?.part;
        let (o, l) = (part.out, part.lse);
        b.synchronize()?;
        let secs = t.elapsed().as_secs_f64();
        Ok((b.download(&o)?, b.download(&l)?, secs))
    })?;
    let mut checks = Vec::new();
    let mut times = Vec::new();
    for (r, (o, l, secs)) in results.into_iter().enumerate() {
        let pos = &shards[r];
        let qr = rows(&q, qw, pos, vec![pos.len(), heads, head_dim])?;
        let want = attention_block(&p, qr.as_slice(), pos, &k, &v, &all)?;
        let tag = format!(
            "ring attention NCCL P={world} rank {r} ({} queries of {len})",
            pos.len()
        );
        checks.push(Check {
            name: format!("{tag} out"),
            rel_err: rel_err(o.as_slice(), &want.out),
            tolerance: 1e-4,
        });
        checks.push(Check {
            name: format!("{tag} lse"),
            rel_err: rel_err(l.as_slice(), &want.lse),
            tolerance: 1e-5,
        });
        times.push(secs);
    }
    Ok((checks, times))
}

/// Fixture models of `scripts/make_fixtures.py` that `fixtures` runs.
pub const FIXTURES: [&str; 4] = [
    "mixtral-tiny",
    "qwen3-moe-tiny",
    "qwen2-moe-tiny",
    "mixtral-tiny-bf16",
];

/// Tolerances of the model checks: logits relative to the reference's largest magnitude.
pub fn logits_tolerance(p: Precision) -> f64 {
    match p {
        Precision::F32 => 1e-3,
        Precision::Bf16 => 1e-2,
    }
}

/// The CUDA model on the committed fixtures (`DIR/<name>/`, with transformers' logits in
/// `reference.safetensors`) in both precisions: logits of a whole forward at each reference
/// length, the same logits decoded token by token through the device K/V cache, and the
/// fraction of router choices that differ from transformers'.
pub fn fixtures(b: &Arc<CudaBackend>, dir: &Path) -> Result<Vec<Check>> {
    let mut out = Vec::new();
    for name in FIXTURES {
        let mdir = dir.join(name);
        let reference = Checkpoint::open_files(&mdir, &[mdir.join("reference.safetensors")])?;
        let ids = |len: usize| -> Result<Vec<u32>> {
            Ok(reference
                .load_i64(&format!("input_ids_L{len}"))?
                .0
                .into_iter()
                .map(|x| x as u32)
                .collect())
        };
        let f32s = |key: &str| -> Result<Vec<f32>> {
            let shape = reference.meta(key)?.shape.clone();
            Ok(reference.load(key, &shape)?.into_vec())
        };
        for precision in [Precision::F32, Precision::Bf16] {
            let tol = logits_tolerance(precision);
            let model = crate::load_model(b.clone(), &mdir, &ExpertSelection::All, precision)?;
            let vocab = model.config.vocab_size;
            let (mut routes, mut differ) = (0usize, 0usize);
            for len in [1, 7, 64, 300] {
                let tokens = ids(len)?;
                let want = f32s(&format!("logits_L{len}"))?;
                let mut cache = model.try_new_cache()?;
                let got = model.forward(&tokens, &mut cache, LogitsFor::All)?;
                out.push(Check {
                    name: format!("{name} {precision:?} logits L={len}"),
                    rel_err: rel_err(got.logits.as_slice(), &want),
                    tolerance: tol,
                });
                let want_routes = reference.load_i64(&format!("router_ids_L{len}"))?.0;
                let got_routes: Vec<i64> = got
                    .routing
                    .iter()
                    .flat_map(|(_, r)| r.expert_ids.iter().map(|&e| i64::from(e)))
                    .collect();
                routes += want_routes.len();
                differ += if got_routes.len() == want_routes.len() {
                    got_routes
                        .iter()
                        .zip(&want_routes)
                        .filter(|(a, b)| a != b)
                        .count()
                } else {
                    want_routes.len()
                };
                if len == 64 {
                    // Prefill 48, then decode 16 tokens one at a time through the cache.
                    let mut cache = model.try_new_cache()?;
                    let mut got = model
                        .forward(&tokens[..48], &mut cache, LogitsFor::Last)?
                        .logits
                        .into_vec();
                    for t in 48..63 {
                        got.extend(
                            model
                                .forward(&tokens[t..t + 1], &mut cache, LogitsFor::Last)?
                                .logits
                                .into_vec(),
                        );
                    }
                    out.push(Check {
                        name: format!("{name} {precision:?} decode 48+15 via K/V cache"),
                        rel_err: rel_err(&got, &want[47 * vocab..63 * vocab]),
                        tolerance: tol,
                    });
                }
            }
            out.push(Check {
                name: format!("{name} {precision:?} router ids differing (fraction)"),
                rel_err: differ as f64 / routes.max(1) as f64,
                tolerance: if precision == Precision::F32 {
                    0.01
                } else {
                    0.05
                },
            });
        }
    }
    Ok(out)
}

/// Prefill and MoE-layer throughput of a model built from `src` (e.g. random weights of the
/// bench configuration) at each length in `tokens`: median of `iters` timed runs after one
/// warm-up, synchronised.
pub fn model_timing(
    b: &Arc<CudaBackend>,
    cfg: &ModelConfig,
    src: &dyn TensorSource,
    precision: Precision,
    tokens: &[usize],
    iters: usize,
) -> Result<Vec<ModelTiming>> {
    let model = crate::model_from_source(
        b.clone(),
        cfg.clone(),
        src,
        &ExpertSelection::All,
        precision,
    )?;
    let moe_layer = |layer: usize, x: &crate::DeviceTensor| -> Result<()> {
        match model.layers().get(layer).map(|l| &l.mlp) {
            Some(ringmoe_model::layers::Mlp::Sparse(m)) => {
                m.forward(&**b, x)?;
                Ok(())
            }
            _ => Err(crate::CudaError::Invalid {
                op: "moe_layer",
                msg: format!("layer {layer} is not a sparse layer of this model"),
            }),
        }
    };
    let sparse = cfg.sparse_layers.iter().position(|&s| s).unwrap_or(0);
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut out = Vec::new();
    for &n in tokens {
        let ids: Vec<u32> = (0..n as u64)
            .map(|i| (i.wrapping_mul(2_654_435_761) % cfg.vocab_size as u64) as u32)
            .collect();
        let x = b.upload(&tensor(&[n, cfg.hidden_size], 60, 1.0)?)?;
        let mut prefill = Vec::new();
        let mut moe = Vec::new();
        for i in 0..=iters.max(1) {
            let t = Instant::now();
            model.forward(&ids, &mut model.try_new_cache()?, LogitsFor::Last)?;
            b.synchronize()?;
            let p = t.elapsed().as_secs_f64();
            let t = Instant::now();
            moe_layer(sparse, &x)?;
            b.synchronize()?;
            let m = t.elapsed().as_secs_f64();
            if i > 0 {
                prefill.push(p);
                moe.push(m);
            }
        }
        let (p, m) = (median(prefill), median(moe));
        out.push(ModelTiming {
            precision,
            tokens: n,
            prefill_secs: p,
            prefill_tokens_per_sec: n as f64 / p,
            moe_secs: m,
            moe_tokens_per_sec: n as f64 / m,
        });
    }
    Ok(out)
}

/// Times causal self-attention over `tokens` positions (median of `iters` after a warm-up).
pub fn attention_timing(
    b: &CudaBackend,
    tokens: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    iters: usize,
) -> Result<AttentionTiming> {
    let p = causal(heads, kv_heads, head_dim);
    let pos: Vec<usize> = (0..tokens).collect();
    let q = b.upload(&tensor(&[tokens, heads, head_dim], 30, 1.0)?)?;
    let k = b.upload(&tensor(&[tokens, kv_heads, head_dim], 31, 1.0)?)?;
    let v = b.upload(&tensor(&[tokens, kv_heads, head_dim], 32, 1.0)?)?;
    b.attention(&p, &q, &pos, &k, &v, &pos)?;
    b.synchronize()?;
    let mut times = Vec::with_capacity(iters.max(1));
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        b.attention(&p, &q, &pos, &k, &v, &pos)?;
        b.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let secs = times[times.len() / 2];
    let flops = 4.0 * (tokens as f64).powi(2) * heads as f64 * head_dim as f64 / 2.0;
    Ok(AttentionTiming {
        tokens,
        heads,
        kv_heads,
        head_dim,
        secs,
        tflops: flops / secs / 1e12,
    })
}

/// Runs `f(rank, backend, communicator)` for `world` ranks, each on a thread of its own with
/// GPU `rank` and one NCCL group between them; their results in rank order, or the first error.
fn on_gpu_ranks<T: Send>(
    world: usize,
    f: impl Fn(usize, &Arc<CudaBackend>, &NcclCommunicator) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let id = ringmoe_comm::nccl::unique_id()?;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let (id, f) = (&id, &f);
                s.spawn(move || -> Result<T> {
                    let b = Arc::new(CudaBackend::new(r)?);
                    let comm = NcclCommunicator::on_context(
                        r,
                        world,
                        id,
                        b.context(),
                        std::time::Duration::from_secs(120),
                    )?;
                    f(r, &b, &comm)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(crate::CudaError::Invalid {
                        op: "gpu-check",
                        msg: "a rank's thread panicked".into(),
                    })
                })
            })
            .collect()
    })
}

/// The distributed forward on `world` GPUs of this machine (rank `r` on GPU `r`, one thread
/// each, one NCCL group): for every fixture, the 300-token prefill zigzag-sharded with ring
/// attention and the experts expert-parallel (round-robin placement, each GPU loading only its
/// experts), without and with two-batch overlap, against the transformers logits; then a 48-token
/// sharded prefill and 15 decode steps over the sharded cache. F32 weights, so the tolerance is the
/// f32 path's. `world = 1` runs every collective as a self-exchange through NCCL.
pub fn distributed(dir: &Path, world: usize) -> Result<Vec<Check>> {
    use ringmoe_parallel::{
        ExpertParallel, JobOptions, Placement, ShardPlan, Sharding, prefill_shard_with,
    };

    let mut out = Vec::new();
    let tol = logits_tolerance(Precision::F32);
    for name in FIXTURES {
        let mdir = dir.join(name);
        let cfg = ModelConfig::from_dir(&mdir)?;
        let reference = Checkpoint::open_files(&mdir, &[mdir.join("reference.safetensors")])?;
        let tokens: Vec<u32> = reference
            .load_i64("input_ids_L300")?
            .0
            .into_iter()
            .map(|x| x as u32)
            .collect();
        let want = reference
            .load("logits_L300", &reference.meta("logits_L300")?.shape.clone())?
            .into_vec();
        let vocab = cfg.vocab_size;
        let placement = Placement::round_robin(cfg.num_layers, cfg.moe.num_experts, world)?;
        // Per rank: (positions, prefill logits) for each overlap setting, and decode logits.
        let results = on_gpu_ranks(world, |r, b, comm| {
            let model =
                crate::load_model(b.clone(), &mdir, &placement.selection(r), Precision::F32)?;
            let plan = ShardPlan::new(tokens.len(), world, Sharding::Zigzag)?;
            let mine = plan.tokens_for(r, &tokens)?;
            let mut prefills = Vec::new();
            for overlap in [false, true] {
                let ep = ExpertParallel {
                    overlap,
                    ..ExpertParallel::new(placement.clone())
                };
                let job = JobOptions::dense(0);
                let o = prefill_shard_with(&model, comm, &plan, &mine, job, Some(&ep))?;
                let logits = model.logits(&o.hidden)?.into_vec();
                prefills.push((o.positions, logits));
            }
            let ep = ExpertParallel::new(placement.clone());
            let plan = ShardPlan::new(48, world, Sharding::Zigzag)?;
            let mine = plan.tokens_for(r, &tokens[..48])?;
            let (mut seq, mut decoded) = crate::CudaShardedSequence::prefill_shard(
                &model,
                comm,
                &plan,
                &mine,
                JobOptions::dense(0),
                Some(&ep),
                &mut |_, _| Ok(()),
            )?;
            for &t in &tokens[48..63] {
                decoded.extend(seq.decode(t)?);
            }
            Ok((prefills, decoded))
        })?;
        for (r, (prefills, decoded)) in results.into_iter().enumerate() {
            for ((positions, logits), overlap) in prefills.iter().zip([false, true]) {
                let mut expect = Vec::with_capacity(logits.len());
                for &p in positions {
                    expect.extend_from_slice(&want[p * vocab..(p + 1) * vocab]);
                }
                out.push(Check {
                    name: format!(
                        "{name} P={world} rank {r} ring + expert-parallel prefill L=300{}",
                        if overlap { " (two-batch overlap)" } else { "" }
                    ),
                    rel_err: rel_err(logits, &expect),
                    tolerance: tol,
                });
            }
            out.push(Check {
                name: format!("{name} P={world} rank {r} sharded decode 48+15"),
                rel_err: rel_err(&decoded, &want[47 * vocab..63 * vocab]),
                tolerance: tol,
            });
        }
    }
    Ok(out)
}
