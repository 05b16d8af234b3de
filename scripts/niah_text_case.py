#!/usr/bin/env python3
"""Writes one needle-in-a-haystack case as text, for the text path (`ringmoe submit FILE`).

The case follows the model's `needle.json` (the format `ringmoe eval niah` documents): haystack
tokens uniform in [LO, HI), a needle `[m, v]` with its marker at position round(depth * (L - 3))
after the optional BOS, and the marker `m` alone at the end; the answer is `v`. The text is the
tokens' words from the model's `tokenizer.json` (a WordLevel vocabulary split on whitespace, as
the needle model's), separated by spaces, so the coordinator's tokenizer gives back the same ids.
Prints the expected answer's word on stdout.

Usage: scripts/niah_text_case.py MODEL_DIR LENGTH DEPTH SEED OUT.txt
"""

import json
import pathlib
import random
import sys


def main() -> int:
    model, length, depth, seed, out = sys.argv[1:6]
    model = pathlib.Path(model)
    task = json.loads((model / "needle.json").read_text())
    tok = json.loads((model / "tokenizer.json").read_text())
    if tok["model"]["type"] != "WordLevel":
        print("only WordLevel vocabularies map one word to one id", file=sys.stderr)
        return 2
    word = {i: w for w, i in tok["model"]["vocab"].items()}
    n = int(length)
    rng = random.Random(int(seed))
    lo, hi = task["haystack"]
    vlo, vhi = task["values"]
    bos = [task["bos"]] if task["bos"] is not None else []
    body = n - len(bos)
    ids = [rng.randrange(lo, hi) for _ in range(body)]
    m = rng.choice(task["markers"])
    v = rng.randrange(vlo, vhi)
    at = round(float(depth) * (n - 3))
    ids[at] = m
    ids[at + 1] = v
    ids[-1] = m
    ids = bos + ids
    assert len(ids) == n
    pathlib.Path(out).write_text(" ".join(word[i] for i in ids))
    print(word[v])
    return 0


if __name__ == "__main__":
    sys.exit(main())
