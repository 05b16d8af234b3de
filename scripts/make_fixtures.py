#!/usr/bin/env python3
"""Builds the tiny Hugging Face checkpoints and the transformers reference outputs under tests/fixtures/.

Every model is made with transformers' own classes and saved with `save_pretrained`, so the files are
exactly what users download from a hub. Reference logits, router top-k ids, greedy generations and
tokenizer ids are computed by transformers and committed; CI never runs this script.

Usage:  python3 -m venv .venv-fixtures && .venv-fixtures/bin/pip install torch transformers tokenizers safetensors
        .venv-fixtures/bin/python scripts/make_fixtures.py [--only NAME[,NAME...]]

`--only` rebuilds the named models and nothing else, reusing the committed tokenizer.json (so adding
a fixture does not rewrite the others); versions.json then gains an entry per rebuilt model.

The windowed models (`qwen2-moe-window`, `mixtral-window`) have a sliding window of 16 tokens, so
the 64- and 300-token reference prompts cross it: Qwen2-MoE windows layers 0 and 2 of 3 (its
`max_window_layers` rule, saved as transformers 5's `layer_types`), Mixtral every layer (saved in
the transformers-4 style, without `layer_types`).

Realism: HF's default init (std 0.02) makes attention almost uniform, which hides RoPE and masking
bugs, and gives near-tied router logits that flip experts under a different summation order. The
weights are therefore rescaled (peaked attention, spread router logits, non-unit norm weights) and
the script reports and asserts the smallest router top-k margin and greedy top-1 margin it produced.
"""

import json
import os
import shutil
import sys

import torch
import transformers
import tokenizers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
PROMPT_LENGTHS = [1, 7, 64, 300]
GEN_TOKENS = 16
MIN_ROUTER_MARGIN = 1e-3  # router-logit gap between the k-th and (k+1)-th expert (softmax is monotone)
MIN_GREEDY_MARGIN = 1e-4  # logit gap between the top-1 and top-2 token during greedy decoding

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Mixture-of-experts models route every token to a few experts chosen by a small router network.",
    "Ring attention passes key and value blocks around a ring of workers while each computes its share.",
    "A million-token context holds a whole codebase, a book, or hours of meeting transcripts.",
    "fn main() { let x = vec![1, 2, 3]; println!(\"{:?}\", x.iter().sum::<i32>()); }",
    "naïve café — déjà vu; Grüße aus Köln; ¿Qué tal? Ça va très bien.",
    "日本語のテキストと中文文本, 한국어 문장, русский текст, ελληνικά.",
    "Numbers: 3.14159, 2.71828, 1e-4, 2026-11-22, 0xDEADBEEF, 42.",
    "emoji 🎉🚀✨ and symbols ∑∫√∞ ≤ ≥ ≠ → ←",
] * 20

TOKENIZER_CASES = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café — déjà vu",
    "日本語のテキスト",
    "emoji 🎉🚀 mixed with text",
    "  leading spaces\tand\ttabs\nand newlines\n\n",
    "Numbers 3.14159 and 2026-11-22",
    "",
    "unseen words: zyxwvut qqqq ŵŷ",
]


def build_tokenizer(path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tok.save(path)
    return tok


def realistic_init(model, seed):
    """Rescales a freshly built model so attention is peaked and routers are decisive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "q_proj.weight" in name or "k_proj.weight" in name:
                p.copy_(0.25 * torch.randn(p.shape, generator=g))
            elif name.endswith("gate.weight") and "shared_expert" not in name:
                p.copy_(1.0 * torch.randn(p.shape, generator=g))  # router
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def reference(model, name, vocab, n_layers_moe_ids, top_k, seed, out_dir, gen_prompt):
    g = torch.Generator().manual_seed(seed + 1000)
    tensors = {}
    min_router_margin = float("inf")
    for L in PROMPT_LENGTHS:
        ids = torch.randint(0, vocab, (1, L), generator=g)
        with torch.no_grad():
            out = model(input_ids=ids, output_router_logits=True, use_cache=False)
        tensors[f"input_ids_L{L}"] = ids[0].clone()
        tensors[f"logits_L{L}"] = out.logits[0].float().clone()
        routers = []
        for layer, rl in zip(n_layers_moe_ids, out.router_logits):
            top = torch.topk(rl.float(), top_k + 1, dim=-1)
            margin = (top.values[:, top_k - 1] - top.values[:, top_k]).min().item()
            min_router_margin = min(min_router_margin, margin)
            routers.append(top.indices[:, :top_k])
        tensors[f"router_ids_L{L}"] = torch.stack(routers).to(torch.int64).contiguous()
    tensors["router_layers"] = torch.tensor(n_layers_moe_ids, dtype=torch.int64)

    prompt = torch.tensor([gen_prompt], dtype=torch.int64)
    with torch.no_grad():
        gen = model.generate(prompt, max_new_tokens=GEN_TOKENS, do_sample=False, output_scores=True, return_dict_in_generate=True)
    new = gen.sequences[0, prompt.shape[1]:]
    min_greedy_margin = min((s[0].topk(2).values[0] - s[0].topk(2).values[1]).item() for s in gen.scores)
    tensors["gen_prompt_ids"] = prompt[0].clone()
    tensors["gen_output_ids"] = new.clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "reference.safetensors"))
    print(f"{name}: min router top-{top_k} margin {min_router_margin:.2e}, min greedy margin {min_greedy_margin:.2e}, generated {new.tolist()}")
    return min_router_margin, min_greedy_margin


def to_transformers4_config(path):
    """Rewrites a saved config in the transformers-4 / hub style: top-level rope_theta, no head_dim: null."""
    cfg = json.load(open(path))
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp["rope_theta"]
    if rp.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        scaling["type"] = scaling.pop("rope_type")
        cfg["rope_scaling"] = scaling
    if cfg.get("head_dim") is None:
        cfg.pop("head_dim", None)
    # transformers 4 had no layer_types: the window follows from sliding_window (Mixtral: every layer).
    cfg.pop("layer_types", None)
    if "num_local_experts" in cfg and cfg["model_type"] in ("qwen3_moe", "qwen2_moe"):
        cfg["num_experts"] = cfg.pop("num_local_experts")
    cfg["transformers_version"] = "4.46.0"
    json.dump(cfg, open(path, "w"), indent=2, sort_keys=True)


def make_model(name, config, seed, tok, gen_prompt, dtype=torch.float32, shard=None, v4_config=False):
    out_dir = os.path.join(ROOT, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    for attempt in range(20):
        torch.manual_seed(seed + attempt)
        model = config.model_cls(config.cfg)
        realistic_init(model, seed + attempt)
        model.eval()
        model.generation_config.eos_token_id = tok.token_to_id("</s>")
        model.generation_config.bos_token_id = tok.token_to_id("<s>")
        model.generation_config.pad_token_id = tok.token_to_id("</s>")
        model.generation_config.do_sample = False
        if dtype != torch.float32:
            # Round the weights to the storage dtype, then compute in f32 on the rounded values: this
            # is the reference for "bf16 checkpoint, f32 compute".
            # Reload from disk rather than `.to(float32)`: casting the live model would also round
            # the RoPE `inv_freq` buffer to bf16 and give a wrong reference.
            model.to(dtype).save_pretrained(out_dir)
            model = config.model_cls.from_pretrained(out_dir, dtype=torch.float32)
            model.eval()
        else:
            model.save_pretrained(out_dir, max_shard_size=shard) if shard else model.save_pretrained(out_dir)
        rm, gm = reference(model, name, config.cfg.vocab_size, config.moe_layers, config.top_k, seed, out_dir, gen_prompt)
        if rm >= MIN_ROUTER_MARGIN and gm >= MIN_GREEDY_MARGIN:
            break
        print(f"  margins too small, reseeding")
        shutil.rmtree(out_dir)
    else:
        sys.exit(f"{name}: could not find a seed with safe margins")
    shutil.copy(os.path.join(ROOT, "tokenizer.json"), os.path.join(out_dir, "tokenizer.json"))
    if v4_config:
        to_transformers4_config(os.path.join(out_dir, "config.json"))


class Spec:
    def __init__(self, model_cls, cfg, moe_layers, top_k):
        self.model_cls, self.cfg, self.moe_layers, self.top_k = model_cls, cfg, moe_layers, top_k


def main():
    only = None
    if len(sys.argv) == 3 and sys.argv[1] == "--only":
        only = set(sys.argv[2].split(","))
    elif len(sys.argv) != 1:
        sys.exit(__doc__)
    os.makedirs(ROOT, exist_ok=True)
    torch.set_num_threads(2)
    if only is None:
        tok = build_tokenizer(os.path.join(ROOT, "tokenizer.json"))
    else:
        tok = Tokenizer.from_file(os.path.join(ROOT, "tokenizer.json"))
    vocab = tok.get_vocab_size()
    if only is None:
        cases = [{"text": t, "ids": tok.encode(t).ids} for t in TOKENIZER_CASES]
        # transformers' own fast tokenizer must agree with the tokenizers library on these.
        fast = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(ROOT, "tokenizer.json"))
        for c in cases:
            assert fast(c["text"])["input_ids"] == c["ids"], c
        json.dump(cases, open(os.path.join(ROOT, "tokenizer_cases.json"), "w"), indent=1, ensure_ascii=False)
    gen_prompt = tok.encode("The quick brown fox").ids

    mixtral = Spec(
        transformers.MixtralForCausalLM,
        transformers.MixtralConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
            max_position_embeddings=1024, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            rms_norm_eps=1e-5, tie_word_embeddings=False,
        ),
        [0, 1], 2,
    )
    qwen3 = Spec(
        transformers.Qwen3MoeForCausalLM,
        transformers.Qwen3MoeConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            num_experts=16, num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1,
            mlp_only_layers=[1], max_position_embeddings=1024, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256},
            tie_word_embeddings=False,
        ),
        [0, 2], 4,
    )
    qwen2 = Spec(
        transformers.Qwen2MoeForCausalLM,
        transformers.Qwen2MoeConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
            decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=1024, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
            tie_word_embeddings=False, use_sliding_window=False,
        ),
        [0, 1], 2,
    )
    qwen2_window = Spec(
        transformers.Qwen2MoeForCausalLM,
        transformers.Qwen2MoeConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
            decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=1024, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False, use_sliding_window=True, sliding_window=16, max_window_layers=3,
        ),
        [0, 1, 2], 2,
    )
    assert qwen2_window.cfg.layer_types == ["sliding_attention", "full_attention", "sliding_attention"], qwen2_window.cfg.layer_types
    mixtral_window = Spec(
        transformers.MixtralForCausalLM,
        transformers.MixtralConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
            max_position_embeddings=1024, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=16,
        ),
        [0, 1], 2,
    )
    builds = {
        "mixtral-tiny": lambda: make_model("mixtral-tiny", mixtral, 11, tok, gen_prompt, v4_config=True),
        "qwen3-moe-tiny": lambda: make_model("qwen3-moe-tiny", qwen3, 23, tok, gen_prompt, shard="100KB"),
        "qwen2-moe-tiny": lambda: make_model("qwen2-moe-tiny", qwen2, 37, tok, gen_prompt),
        "mixtral-tiny-bf16": lambda: make_model("mixtral-tiny-bf16", mixtral, 11, tok, gen_prompt, dtype=torch.bfloat16),
        "qwen2-moe-window": lambda: make_model("qwen2-moe-window", qwen2_window, 41, tok, gen_prompt),
        "mixtral-window": lambda: make_model("mixtral-window", mixtral_window, 43, tok, gen_prompt, v4_config=True),
    }
    unknown = (only or set()) - set(builds)
    if unknown:
        sys.exit(f"unknown fixtures {sorted(unknown)}; known: {sorted(builds)}")
    for name, build in builds.items():
        if only is None or name in only:
            build()
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__, "python": sys.version.split()[0]}
    path = os.path.join(ROOT, "versions.json")
    if only is not None:
        # The other fixtures keep the versions they were made with.
        kept = json.load(open(path))
        kept.setdefault("rebuilt", {}).update({name: versions for name in sorted(only)})
        versions = kept
    json.dump(versions, open(path, "w"), indent=1)


if __name__ == "__main__":
    main()
