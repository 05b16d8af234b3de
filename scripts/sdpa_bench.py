"""PyTorch's scaled_dot_product_attention on the shapes `ringmoe gpu-check` times.

Causal self-attention of one sequence, grouped-query heads expanded to full heads, in f32 (the
precision of ringmoe's attention kernel today) and bf16 (flash attention). Prints one JSON object.

    python3 scripts/sdpa_bench.py --attention 4096:32:8:128,16384:32:8:128 --iters 10
"""

import argparse
import json

import torch
import torch.nn.functional as F


def time_one(tokens, heads, kv_heads, head_dim, dtype, iters):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, heads, tokens, head_dim, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(1, kv_heads, tokens, head_dim, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(1, kv_heads, tokens, head_dim, device="cuda", dtype=dtype, generator=g)
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.cuda.synchronize()
    times = []
    for _ in range(max(iters, 1)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    secs = times[len(times) // 2]
    flops = 4.0 * tokens * tokens * heads * head_dim / 2.0
    return {"secs": secs, "tflops": flops / secs / 1e12}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--attention", default="4096:32:8:128,16384:32:8:128")
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "sdpa": []}
    for s in a.attention.split(","):
        t, h, kv, d = (int(x) for x in s.split(":"))
        row = {"tokens": t, "heads": h, "kv_heads": kv, "head_dim": d}
        for name, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
            row[name] = time_one(t, h, kv, d, dt, a.iters)
        out["sdpa"].append(row)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
