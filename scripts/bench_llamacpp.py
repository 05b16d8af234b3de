#!/usr/bin/env python3
"""The llama.cpp half of scripts/bench_llamacpp.sh: converts the bench checkpoint to GGUF at f32,
bf16 and Q8_0 with llama.cpp's gguf-py, then alternates llama-bench with ringmoe at the matching
precision and prints medians and ratios (ringmoe / llama.cpp).

Precisions compared:
  f32  llama.cpp F32 GGUF     vs ringmoe --weights f32 on the f32 checkpoint
  bf16 llama.cpp BF16 GGUF    vs ringmoe --weights native on the bf16 checkpoint
  q8   llama.cpp Q8_0 GGUF    vs ringmoe --weights q8 on the f32 checkpoint
Norms and the router stay f32 in every GGUF (as in ringmoe).

Throughput only: the tokens are random ids on both sides, and the GGUF carries a placeholder
vocabulary (byte tokens plus numbered ones), so no text is compared here.
"""

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys

import numpy as np

import gguf


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        assert meta["dtype"] == "F32", f"{name}: expected an f32 checkpoint, got {meta['dtype']}"
        out[name] = np.frombuffer(data[a:b], dtype=np.float32).reshape(meta["shape"])
    return out


def permute(w, heads):
    # HF's rotate-half q/k rows to GGML's interleaved pairs (as convert_hf_to_gguf.py does).
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert(model_dir, out, qtype):
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    t = read_safetensors(os.path.join(model_dir, "model.safetensors"))
    w = gguf.GGUFWriter(out, "llama")
    h, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(h)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_dimension_count(h // nh)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(cfg["num_local_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type({"F32": 0, "BF16": 32, "Q8_0": 7}[qtype.name])
    # A placeholder SentencePiece vocabulary: <unk> <s> </s>, the 256 byte tokens, numbered rest.
    tokens, types = ["<unk>", "<s>", "</s>"], [2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    tokens += [f"t{i}" for i in range(len(tokens), cfg["vocab_size"])]
    types += [1] * (cfg["vocab_size"] - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def add(name, arr, keep_f32=False):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        q = gguf.GGMLQuantizationType.F32 if keep_f32 or arr.ndim == 1 else qtype
        data = gguf.quants.quantize(arr, q) if q != gguf.GGMLQuantizationType.F32 else arr
        w.add_tensor(name, data, raw_dtype=q)

    add("token_embd.weight", t["model.embed_tokens.weight"])
    add("output_norm.weight", t["model.norm.weight"])
    add("output.weight", t["lm_head.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        add(f"blk.{i}.attn_norm.weight", t[f"{p}.input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", permute(t[f"{p}.self_attn.q_proj.weight"], nh))
        add(f"blk.{i}.attn_k.weight", permute(t[f"{p}.self_attn.k_proj.weight"], nkv))
        add(f"blk.{i}.attn_v.weight", t[f"{p}.self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", t[f"{p}.self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", t[f"{p}.post_attention_layernorm.weight"])
        m = f"{p}.block_sparse_moe"
        add(f"blk.{i}.ffn_gate_inp.weight", t[f"{m}.gate.weight"], keep_f32=True)
        for ours, theirs in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
            stacked = np.stack([t[f"{m}.experts.{e}.{ours}.weight"] for e in range(cfg["num_local_experts"])])
            add(f"blk.{i}.ffn_{theirs}_exps.weight", stacked)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama(bench, gguf_path, threads, args):
    cmd = [bench, "-m", gguf_path, "-t", str(threads), "-r", "1", "-o", "json", *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)[0]["avg_ts"]


def ringmoe(binary, args):
    out = subprocess.run([binary, "bench", *args, "--json"], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--ringmoe", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--model-bf16", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", default="f32,bf16,q8")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    Q = gguf.GGMLQuantizationType
    setups = {
        "f32": (Q.F32, a.model, "f32"),
        "bf16": (Q.BF16, a.model_bf16, "native"),
        "q8": (Q.Q8_0, a.model, "q8"),
    }
    chosen = a.precisions.split(",")
    for p in chosen:
        path = os.path.join(a.work, f"bench-{p}.gguf")
        if not os.path.exists(path):
            print(f"converting to {path}", file=sys.stderr)
            convert(a.model, path + ".tmp", setups[p][0])
            os.replace(path + ".tmp", path)
    tests = {
        "prefill 512": (["-p", "512", "-n", "0"], lambda m, w: ["prefill", "--model", m, "--weights", w, "--tokens", "512", "--warmup", "1", "--repeat", "1"], "best_tokens_per_sec"),
        "prefill 2048": (["-p", "2048", "-n", "0"], lambda m, w: ["prefill", "--model", m, "--weights", w, "--tokens", "2048", "--warmup", "1", "--repeat", "1"], "best_tokens_per_sec"),
        "decode 128 after 512": (["-p", "0", "-n", "128", "-d", "512"], lambda m, w: ["decode", "--model", m, "--weights", w, "--prompt-tokens", "512", "--new-tokens", "128", "--repeat", "1"], "median_decode_tokens_per_sec"),
    }
    results = {p: {t: {"llama.cpp": [], "ringmoe": []} for t in tests} for p in chosen}
    load = os.getloadavg()
    for r in range(a.rounds):
        for p in chosen:
            q, model, weights = setups[p]
            g = os.path.join(a.work, f"bench-{p}.gguf")
            for name, (largs, rargs, key) in tests.items():
                # Alternate which side goes first from round to round.
                sides = [("llama.cpp", lambda: llama(a.llama_bench, g, a.threads, largs)),
                         ("ringmoe", lambda: ringmoe(a.ringmoe, rargs(model, weights))[key])]
                for side, run in (sides if r % 2 == 0 else sides[::-1]):
                    v = run()
                    results[p][name][side].append(v)
                    print(f"round {r + 1} {p} {name} {side}: {v:.1f} tok/s", file=sys.stderr)
    summary = {}
    for p in chosen:
        for name in tests:
            l = statistics.median(results[p][name]["llama.cpp"])
            m = statistics.median(results[p][name]["ringmoe"])
            summary[f"{p} {name}"] = {"llama.cpp": l, "ringmoe": m, "ratio": m / l}
    if a.json:
        print(json.dumps({"rounds": a.rounds, "threads": a.threads, "loadavg_before": load,
                          "loadavg_after": os.getloadavg(), "results": results, "summary": summary}))
    else:
        print(f"medians of {a.rounds} alternating rounds, {a.threads} threads, load average before {load[0]:.2f}, after {os.getloadavg()[0]:.2f}")
        print(f"{'':32} {'llama.cpp':>10} {'ringmoe':>10} {'ratio':>7}")
        for k, v in summary.items():
            print(f"{k:32} {v['llama.cpp']:10.1f} {v['ringmoe']:10.1f} {v['ratio']:6.2f}x")


if __name__ == "__main__":
    main()
