#!/usr/bin/env python3
"""Chat templates for the fixtures, and transformers' renderings of them.

Writes `tokenizer_config.json` (special tokens and a real model family's `chat_template`) into
three fixture checkpoints and records, in `tests/fixtures/chat_cases.json`, what transformers'
`apply_chat_template(..., tokenize=False)` renders for a set of conversations, or the error it
raises. `ringmoe-hf`'s chat tests and the HTTP API's tests render the same conversations and
compare. `qwen3-moe-tiny` keeps no template (the "model without a template" case).

Needs only transformers (no torch); CI never runs it, the outputs are committed.

Usage:  python3 -m venv .venv-fixtures && .venv-fixtures/bin/pip install transformers jinja2
        .venv-fixtures/bin/python scripts/make_chat_fixtures.py
"""

import json
import os

import transformers

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")

# mistralai/Mixtral-8x7B-Instruct-v0.1: strict user/assistant alternation, BOS in the template.
MIXTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Qwen/Qwen1.5-MoE-A2.7B-Chat (ChatML, a default system prompt).
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# HuggingFaceH4/zephyr-7b-beta: one block per line, so trim_blocks/lstrip_blocks matter.
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)

TEMPLATES = {"mixtral-tiny": MIXTRAL, "qwen2-moe-tiny": CHATML, "mixtral-tiny-bf16": ZEPHYR}

CONVERSATIONS = [
    [{"role": "user", "content": "The quick brown fox"}],
    [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "General Kenobi"},
        {"role": "user", "content": "héllo wörld 🎉"},
    ],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
]


def main():
    cases = []
    for name, template in TEMPLATES.items():
        d = os.path.join(ROOT, name)
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "add_bos_token": True,
            "chat_template": template,
        }
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f, indent=1, ensure_ascii=False)
        tok = transformers.AutoTokenizer.from_pretrained(d)
        for messages in CONVERSATIONS:
            for gen in (True, False):
                case = {"model": name, "messages": messages, "add_generation_prompt": gen}
                try:
                    case["prompt"] = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
                    # What apply_chat_template(tokenize=True) gives: no second BOS.
                    case["ids"] = tok(case["prompt"], add_special_tokens=False)["input_ids"]
                except Exception as e:  # the template's raise_exception
                    case["error"] = str(e)
                cases.append(case)
    with open(os.path.join(ROOT, "chat_cases.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "cases": cases}, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
