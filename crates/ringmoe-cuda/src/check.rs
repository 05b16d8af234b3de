//! `ringmoe gpu-check`: every CUDA kernel against ringmoe-core's CPU kernel on random inputs,
//! with explicit tolerances, and the attention kernel's throughput on given shapes.

use std::time::Instant;

use ringmoe_core::ops::{rms_norm, softmax_inplace, swiglu_fused, top_k};
use ringmoe_core::rope::{RopeFreqs, apply_rope};
use ringmoe_core::testing::rand_vec;
use ringmoe_core::{AttentionParams, Tensor, attention_block};

pub use crate::report::{AttentionTiming, Check};
use crate::{CudaBackend, Result};

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
    let (dx, dw) = (b.upload(&x)?, b.upload(&w)?);
    push(
        "matmul f32",
        b.download(&b.matmul_nt(&dx, &dw)?)?.as_slice(),
        &want,
        1e-4,
    );
    let wb = b.upload_bf16(&w)?;
    push(
        "matmul bf16→f32",
        b.download(&b.linear(&dx, &wb)?)?.as_slice(),
        &want,
        1e-2,
    );

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
    let dws: Vec<_> = ws.iter().map(|w| b.upload_bf16(w)).collect::<Result<_>>()?;
    let refs: Vec<_> = dws.iter().collect();
    let got = b.grouped_linear(&b.upload(&xs)?, &rows, &refs)?;
    push(
        "grouped expert GEMM bf16",
        b.download(&got)?.as_slice(),
        &want,
        1.5e-2,
    );

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
    let p = AttentionParams {
        n_heads: heads,
        n_kv_heads: kv_heads,
        head_dim,
        scale: 1.0 / (head_dim as f32).sqrt(),
        causal: true,
    };
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
