#!/usr/bin/env python3
"""ringmoe vs Hugging Face transformers on the same bench-size Mixtral, alternating in one run.

Builds the bench model (vocab 32000, hidden 1024, intermediate 2816, 4 layers, 16 heads, 8 KV
heads, 8 experts, top-2) with transformers, saves it, then alternates:
  * prefill of N random tokens: transformers (default attention and experts implementation,
    logits for the last position only) vs `ringmoe bench prefill` (same); each side has one
    untimed full-size warm-up run before it is timed;
  * the grouped expert GEMM (8 experts x 512 rows: gate/up GEMM, SwiGLU, down GEMM): torch
    (sgemm via `x @ W.T`) vs `ringmoe bench experts`.
Both use every core of the machine. Prints medians and ratios; --json for machines.

Usage: python3 scripts/bench_hf.py [--tokens 2048] [--rounds 3] [--ringmoe target/release/ringmoe]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import transformers


def build_model(path):
    cfg = transformers.MixtralConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
        num_attention_heads=16, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    if not os.path.exists(os.path.join(path, "config.json")):
        model.save_pretrained(path)
    return model


def hf_prefill(model, tokens, seed):
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        t = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        return tokens / (time.perf_counter() - t)


def ringmoe_json(binary, args):
    out = subprocess.run([binary, "bench", *args, "--json"], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def torch_experts_gflops(experts=8, rows=512, hidden=1024, inter=2816):
    g = torch.Generator().manual_seed(1)
    w_gu = [torch.rand(2 * inter, hidden, generator=g) - 0.5 for _ in range(experts)]
    w_d = [torch.rand(hidden, inter, generator=g) - 0.5 for _ in range(experts)]
    x = torch.rand(experts, rows, hidden, generator=g) - 0.5
    with torch.inference_mode():
        t = time.perf_counter()
        for e in range(experts):
            gate, up = (x[e] @ w_gu[e].T).chunk(2, dim=-1)
            _ = (torch.nn.functional.silu(gate) * up) @ w_d[e].T
        dt = time.perf_counter() - t
    return 6.0 * experts * rows * hidden * inter / dt / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ringmoe", default="target/release/ringmoe")
    ap.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "ringmoe-bench-mixtral"))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    model = build_model(a.model_dir)
    hf_pre, rm_pre, hf_gemm, rm_gemm = [], [], [], []
    # Both sides get one untimed full-size run first (ringmoe: --warmup 1 in each process).
    hf_prefill(model, a.tokens, 99)
    torch_experts_gflops()
    for r in range(a.rounds):
        hf_pre.append(hf_prefill(model, a.tokens, r))
        rm_pre.append(ringmoe_json(a.ringmoe, ["prefill", "--model", a.model_dir, "--tokens", str(a.tokens), "--warmup", "1", "--repeat", "1", "--seed", str(r)])["best_tokens_per_sec"])
        hf_gemm.append(torch_experts_gflops())
        rm_gemm.append(ringmoe_json(a.ringmoe, ["experts", "--repeat", "1"])["best_gflops"])
    res = {
        "machine": f"{threads} threads, {os.uname().machine}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": model.config._attn_implementation,
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "tokens": a.tokens,
        "prefill_tokens_per_sec": {"transformers": hf_pre, "ringmoe": rm_pre},
        "expert_gemm_gflops": {"torch": hf_gemm, "ringmoe": rm_gemm},
    }
    res["prefill_ratio"] = statistics.median(rm_pre) / statistics.median(hf_pre)
    res["expert_gemm_ratio"] = statistics.median(rm_gemm) / statistics.median(hf_gemm)
    if a.json:
        print(json.dumps(res))
        return
    print(f"machine: {res['machine']}; torch {res['torch']}, transformers {res['transformers']} "
          f"(attention {res['attn_implementation']}, experts {res['experts_implementation']})")
    print(f"prefill {a.tokens} tokens, median of {a.rounds} alternating rounds:")
    print(f"  transformers {statistics.median(hf_pre):9.1f} tokens/s   ringmoe {statistics.median(rm_pre):9.1f} tokens/s   ratio {res['prefill_ratio']:.2f}x")
    print("expert grouped GEMM (8 experts x 512 rows, hidden 1024, intermediate 2816):")
    print(f"  torch        {statistics.median(hf_gemm):9.1f} GFLOP/s    ringmoe {statistics.median(rm_gemm):9.1f} GFLOP/s    ratio {res['expert_gemm_ratio']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
