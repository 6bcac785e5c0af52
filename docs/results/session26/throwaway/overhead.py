"""Where a one-client request's time goes: the same greedy prompts offline (gen.stream) and through
``medusa-run serve`` (max-batch 16, as the load test starts it), read by a bare httpx SSE reader and
by the openai client. Prints tok/s and ms per token for each.

    python docs/results/session26/throwaway/overhead.py artifacts/smollm2-135m-medusa [--plain]
"""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT))

import runtime  # noqa: E402

art = sys.argv[1]
plain = "--plain" in sys.argv
prompts = [json.loads(line)["turns"][0] for line in open(ROOT.parent / "shared/data/mt_bench_question.jsonl")][:6]
N = 128


def offline():
    gen = runtime.load(art, threads=2)
    toks, secs = 0, 0.0
    for p in prompts:
        msgs = [{"role": "user", "content": p}]
        t = time.perf_counter()
        out = gen.generate(msgs, max_new_tokens=N, medusa=not plain)
        secs += time.perf_counter() - t
        toks += len(out.tokens)
    gen.close()
    return toks, secs


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(reader):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "runtime.cli",
        "serve",
        art,
        "--port",
        str(port),
        "--max-batch",
        "16",
        "--threads",
        "2",
    ]
    cmd += ["--plain"] if plain else []
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        reader(url, prompts[0])  # warm-up
        toks, secs = 0, 0.0
        for p in prompts:
            t = time.perf_counter()
            toks += reader(url, p)
            secs += time.perf_counter() - t
        return toks, secs
    finally:
        proc.terminate()
        proc.wait(30)


def bare(url, p):
    body = {
        "messages": [{"role": "user", "content": p}],
        "max_tokens": N,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    used = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                frame = json.loads(line[6:])
                if frame.get("usage"):
                    used = frame["usage"]["completion_tokens"]
    return used


def client(url, p):
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    used = 0
    for chunk in c.chat.completions.create(
        model="smollm2-135m-medusa",
        messages=[{"role": "user", "content": p}],
        max_tokens=N,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage:
            used = chunk.usage.completion_tokens
    return used


for name, fn in [
    ("offline", offline),
    ("server, httpx", lambda: served(bare)),
    ("server, openai", lambda: served(client)),
]:
    toks, secs = fn()
    print(
        f"{'plain' if plain else 'medusa'} {name:16s} {toks / secs:7.1f} tok/s  {1000 * secs / toks:5.1f} ms/token",
        flush=True,
    )
