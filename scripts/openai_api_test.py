#!/usr/bin/env python3
"""The OpenAI-compatible HTTP API against `ringmoe serve` on the fixtures, with the real
`openai` Python client (and its HTTP library, httpx2, for raw requests).

    scripts/openai_api_test.py target/debug/ringmoe

Checks: completions and chat completions, streaming and not; the text equals what a gRPC
`generate` job (`ringmoe submit`) makes of the same prompt and seed; streamed chunks
concatenate to the non-streamed text; chat prompts render and tokenize as transformers'
`apply_chat_template` does (the fixture's recorded ids); `logprobs` equal a score job's NLLs
(<= 1e-4); bad inputs get the right status and an OpenAI error body, as the client's typed
exceptions, and the server keeps serving; an overloaded or worker-less coordinator answers
429/503 with Retry-After; a client that disconnects mid-stream cancels its job; with
`--auth-tokens-file`, the client's `api_key` is its token (a wrong one is the client's
AuthenticationError) and a client's `max_input_tokens` is a BadRequestError.
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import httpx2 as httpx
import openai

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIX = os.path.join(ROOT, "tests", "fixtures")
BIN = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "debug", "ringmoe"))
PROMPT = "The quick brown fox jumps over the lazy dog"

failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


class Proc:
    """A ringmoe process; stdout lines are collected, stderr goes to a log file."""

    def __init__(self, args, log):
        self.log = log
        self.p = subprocess.Popen([BIN] + args, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
        self.lines = []
        self.cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            with self.cv:
                self.lines.append(line.strip())
                self.cv.notify_all()

    def line(self, prefix, timeout=60):
        end = time.time() + timeout
        with self.cv:
            while True:
                for l in self.lines:
                    if l.startswith(prefix):
                        return l[len(prefix):]
                left = end - time.time()
                if left <= 0 or self.p.poll() is not None:
                    raise RuntimeError(f"no '{prefix}' line from {self.p.args}; log: {open(self.log).read()[-3000:]}")
                self.cv.wait(left)

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()


def submit(grpc, *args):
    out = subprocess.run([BIN, "submit", "--addr", grpc, "--json", *args], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"submit {args}: {out.stderr}")
    return json.loads(out.stdout)


def main():
    tmp = tempfile.mkdtemp(prefix="ringmoe-openai-")
    mixtral = os.path.join(FIX, "mixtral-tiny")
    qwen3 = os.path.join(FIX, "qwen3-moe-tiny")
    serve = Proc(
        ["serve", "--model", mixtral, "--model", qwen3, "--workers", "2", "--addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0",
         "--http-addr", "127.0.0.1:0", "--http-max-body-bytes", "65536", "--store", os.path.join(tmp, "jobs")],
        os.path.join(tmp, "serve.log"),
    )
    try:
        grpc = serve.line("listening on ")
        base = serve.line("http api on ")
        run_api_checks(grpc, base, serve)
    finally:
        serve.stop()
    run_capacity_checks(tmp)
    run_auth_checks(tmp)
    if failures:
        print(f"{len(failures)} check(s) failed: {failures}\nlogs in {tmp}", file=sys.stderr)
        sys.exit(1)
    print("all OpenAI API checks passed")


def run_api_checks(grpc, base, serve):
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    models = sorted(m.id for m in client.models.list().data)
    check(models == ["mixtral-tiny", "qwen3-moe-tiny"], f"/v1/models lists the served models: {models}")
    h = httpx.get(base + "/health")
    check(h.status_code == 200 and h.json()["workers"] == 2, f"/health: {h.status_code} {h.text}")

    # Completions: the same text as a gRPC generate job of the same prompt and seed.
    with open(os.path.join(serve.log + ".prompt"), "w") as f:
        f.write(PROMPT)
    for temp, seed in [(0.0, 0), (0.8, 1234)]:
        want = submit(grpc, "--model", "mixtral-tiny", "--file", serve.log + ".prompt", "--max-new-tokens", "24",
                      "--temperature", str(temp), "--seed", str(seed))
        r = client.completions.create(model="mixtral-tiny", prompt=PROMPT, max_tokens=24, temperature=temp, seed=seed)
        got = r.choices[0].text
        check(got == want["text"], f"completion (T={temp}, seed {seed}) equals the gRPC job's text: {got!r} vs {want['text']!r}")
        check(r.usage.completion_tokens == len(want["tokens"]), f"usage.completion_tokens {r.usage.completion_tokens} = {len(want['tokens'])}")
        check(r.choices[0].finish_reason in ("length", "stop"), f"finish_reason {r.choices[0].finish_reason}")
        chunks = list(client.completions.create(model="mixtral-tiny", prompt=PROMPT, max_tokens=24, temperature=temp,
                                                seed=seed, stream=True, stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
        check(streamed == got, f"streamed completion chunks concatenate to the text: {streamed!r}")
        usage = [c.usage for c in chunks if c.usage]
        check(len(usage) == 1 and usage[0].completion_tokens == len(want["tokens"]), f"stream usage chunk: {usage}")
        check(chunks[-1].choices == [] and any(c.choices and c.choices[0].finish_reason for c in chunks),
              "the stream ends with finish_reason, then usage")

    # Stop strings: the text ends before the first stop string.
    full = client.completions.create(model="mixtral-tiny", prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    stop = full[5:7]
    r = client.completions.create(model="mixtral-tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    cut = full[: full.find(stop)]
    check(r.choices[0].text == cut and r.choices[0].finish_reason == "stop", f"stop {stop!r}: {r.choices[0].text!r} vs {cut!r}")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="mixtral-tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop], stream=True) if c.choices)
    check(streamed == cut, f"streamed with stop: {streamed!r}")

    # Logprobs: echo + logprobs + max_tokens=0 scores the prompt like a score job.
    score = submit(grpc, "--model", "mixtral-tiny", "--file", serve.log + ".prompt", "--mode", "score")
    r = client.completions.create(model="mixtral-tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    lp = r.choices[0].logprobs
    check(r.choices[0].text == PROMPT, f"echo returns the prompt: {r.choices[0].text!r}")
    check(lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(score["nll"]) + 1,
          f"one logprob per prompt token, the first None: {len(lp.token_logprobs)} vs {len(score['nll'])}+1")
    d = max(abs(a + b) for a, b in zip(lp.token_logprobs[1:], score["nll"]))
    check(d <= 1e-4, f"logprobs = -NLL of the score job: max |diff| {d:.2e}")
    check(len(lp.tokens) == len(lp.text_offset) == len(lp.token_logprobs), "tokens, text_offset, token_logprobs align")
    r = client.completions.create(model="mixtral-tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0)
    lp = r.choices[0].logprobs.token_logprobs
    check(len(lp) == r.usage.completion_tokens and all(x is not None and x <= 0 for x in lp),
          f"logprobs of the generated tokens: {lp}")

    # Chat: rendered and tokenized as transformers does; generated like a completion of those ids.
    cases = json.load(open(os.path.join(FIX, "chat_cases.json")))["cases"]
    case = next(c for c in cases if c["model"] == "mixtral-tiny" and c.get("ids") and c["add_generation_prompt"])
    r = client.chat.completions.create(model="mixtral-tiny", messages=case["messages"], max_tokens=16, temperature=0.7, seed=7)
    want = client.completions.create(model="mixtral-tiny", prompt=case["ids"], max_tokens=16, temperature=0.7, seed=7)
    check(r.choices[0].message.content == want.choices[0].text and r.choices[0].message.role == "assistant",
          f"chat = completion of transformers' chat-template ids: {r.choices[0].message.content!r} vs {want.choices[0].text!r}")
    check(r.usage.prompt_tokens == len(case["ids"]), f"chat prompt_tokens {r.usage.prompt_tokens} = {len(case['ids'])}")
    chunks = list(client.chat.completions.create(model="mixtral-tiny", messages=case["messages"], max_tokens=16,
                                                 temperature=0.7, seed=7, stream=True))
    check(chunks[0].choices[0].delta.role == "assistant", "the chat stream starts with the assistant role")
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(streamed == r.choices[0].message.content, f"streamed chat deltas concatenate to the message: {streamed!r}")

    # Errors, as the client's typed exceptions.
    def raises(exc, what, f, contains=""):
        try:
            f()
            check(False, f"{what}: no error")
        except exc as e:
            check(contains in str(e), f"{what}: {type(e).__name__} ({contains!r} in {str(e)[:160]!r})")
        except Exception as e:
            check(False, f"{what}: {type(e).__name__} {e}")

    raises(openai.NotFoundError, "unknown model", lambda: client.completions.create(model="nope", prompt="x"), "nope")
    raises(openai.BadRequestError, "n=2", lambda: client.completions.create(model="mixtral-tiny", prompt="x", n=2), "n: 1")
    raises(openai.BadRequestError, "negative max_tokens",
           lambda: client.completions.create(model="mixtral-tiny", prompt="x", max_tokens=-1), "max_tokens")
    raises(openai.BadRequestError, "a model without a chat template",
           lambda: client.chat.completions.create(model="qwen3-moe-tiny", messages=[{"role": "user", "content": "x"}]), "chat template")
    bad_roles = next(c for c in cases if c["model"] == "mixtral-tiny" and c.get("error"))
    raises(openai.BadRequestError, "the template's raise_exception",
           lambda: client.chat.completions.create(model="mixtral-tiny", messages=bad_roles["messages"]), bad_roles["error"])

    # Raw bad bodies: status, OpenAI error shape, and the next good request succeeds.
    url = base + "/v1/completions"
    for what, body, status in [
        ("malformed JSON", b'{"model": "mixtral-tiny", "prompt": ', 400),
        ("wrong type", json.dumps({"model": "mixtral-tiny", "prompt": "x", "max_tokens": "5"}).encode(), 400),
        ("invalid UTF-8", b'{"model": "mixtral-tiny", "prompt": "\xff\xfe"}', 400),
        ("not an object", b"[1, 2, 3]", 400),
        ("huge body", json.dumps({"model": "mixtral-tiny", "prompt": "x" * 100_000}).encode(), 413),
        ("unknown field", json.dumps({"model": "mixtral-tiny", "prompt": "x", "tools": []}).encode(), 400),
    ]:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
        err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
        check(r.status_code == status and set(err) == {"message", "type", "param", "code"} and err["message"],
              f"{what}: {r.status_code} (want {status}) {r.text[:140]}")
        ok = client.completions.create(model="mixtral-tiny", prompt="x", max_tokens=2)
        check(len(ok.choices) == 1, f"the server serves after {what}")
    r = httpx.post(url, content=json.dumps({"model": "mixtral-tiny", "prompt": "x" * 100_000}).encode())
    check("gRPC" in r.json()["error"]["message"], "the 413 points long inputs to gRPC")
    r = httpx.get(base + "/v1/nothing")
    check(r.status_code == 404 and "error" in r.json(), f"unknown route: {r.status_code}")

    # A client that disconnects mid-stream cancels its job.
    with httpx.stream("POST", url, json={"model": "mixtral-tiny", "prompt": PROMPT, "max_tokens": 900, "stream": True,
                                         "temperature": 1.0, "seed": 3}, timeout=60) as s:
        first = next(l for l in s.iter_lines() if l.startswith("data: "))
        job = json.loads(first[len("data: "):])["id"].split("-")[1]
    # The server logs the cancel it sent for the gone client (the phase then may still be
    # Decode: the run stops asynchronously), then the job's end as Cancelled.
    end = time.time() + 20
    cancelled = False
    while time.time() < end and not cancelled:
        log = open(serve.log).read().splitlines()
        gone = any(f"job={job} " in l for l in log if "HTTP client gone" in l)
        cancelled = gone and any(f"job finished job={job} state=Cancelled" in l for l in log)
        time.sleep(0.2)
    check(cancelled, f"disconnecting cancels job {job}")


def run_capacity_checks(tmp):
    # A coordinator with no workers: 503 with Retry-After; past --http-max-jobs: 429.
    c = Proc(["coordinator", "--addr", "127.0.0.1:0", "--store", os.path.join(tmp, "jobs2"),
              "--model", os.path.join(FIX, "mixtral-tiny"), "--http-addr", "127.0.0.1:0", "--http-max-jobs", "1"],
             os.path.join(tmp, "coordinator.log"))
    held = None
    try:
        grpc = c.line("listening on ")
        base = c.line("http api on ")
        body = {"model": "mixtral-tiny", "prompt": "x", "max_tokens": 2}
        r = httpx.post(base + "/v1/completions", json=body)
        check(r.status_code == 503 and r.headers.get("retry-after"), f"no workers: {r.status_code} {r.headers.get('retry-after')}")
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        try:
            client.completions.create(**body)
            check(False, "no workers: no error")
        except openai.InternalServerError as e:
            check(e.status_code == 503, "no workers: the client's InternalServerError (503)")
        # A gRPC job waits in the queue (no workers): the server holds as many as it takes.
        with open(os.path.join(tmp, "p.txt"), "w") as f:
            f.write("x")
        held = subprocess.Popen([BIN, "submit", "--addr", grpc, "--file", os.path.join(tmp, "p.txt")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.time() + 20
        while time.time() < end:
            r = httpx.post(base + "/v1/completions", json=body)
            if r.status_code == 429:
                break
            time.sleep(0.2)
        check(r.status_code == 429 and r.headers.get("retry-after") and r.json()["error"]["type"] == "rate_limit_error",
              f"past --http-max-jobs: {r.status_code} {r.text[:120]}")
        try:
            client.completions.create(**body)
            check(False, "429: no error")
        except openai.RateLimitError:
            check(True, "429 is the client's RateLimitError")
    finally:
        if held:
            held.kill()
        c.stop()


def run_auth_checks(tmp):
    # Tokens from `ringmoe token new`; the openai client's api_key is the bearer token.
    def new_token(name):
        out = subprocess.run([BIN, "token", "new", name], capture_output=True, text=True, check=True)
        token, line = out.stdout.splitlines()
        return token, line
    alice, line_a = new_token("alice")
    tokens = os.path.join(tmp, "tokens")
    with open(tokens, "w") as f:
        f.write(f"{line_a} max_input_tokens=32\n")
    serve = Proc(["serve", "--model", os.path.join(FIX, "mixtral-tiny"), "--workers", "1", "--addr", "127.0.0.1:0",
                  "--no-metrics", "--http-addr", "127.0.0.1:0", "--store", os.path.join(tmp, "jobs3"),
                  "--auth-tokens-file", tokens], os.path.join(tmp, "serve-auth.log"))
    try:
        serve.line("listening on ")
        base = serve.line("http api on ")
        stranger = openai.OpenAI(base_url=base + "/v1", api_key="rmk_guessed", max_retries=0)
        try:
            stranger.models.list()
            check(False, "a wrong api_key listed the models")
        except openai.AuthenticationError as e:
            check(e.status_code == 401 and e.code == "invalid_api_key", f"a wrong api_key: AuthenticationError ({e.status_code}, {e.code})")
        client = openai.OpenAI(base_url=base + "/v1", api_key=alice, max_retries=0)
        check([m.id for m in client.models.list().data] == ["mixtral-tiny"], "alice's token lists the models")
        r = client.completions.create(model="mixtral-tiny", prompt=PROMPT, max_tokens=3, temperature=0)
        check(r.usage.completion_tokens == 3, "alice's token runs a completion")
        try:
            client.completions.create(model="mixtral-tiny", prompt=PROMPT * 8, max_tokens=1)
            check(False, "over max_input_tokens: no error")
        except openai.BadRequestError as e:
            check("max_input_tokens" in str(e), "over alice's max_input_tokens: BadRequestError")
    finally:
        serve.stop()


if __name__ == "__main__":
    main()
