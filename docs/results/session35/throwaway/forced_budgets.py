"""The Medusa server at two streaming clients with the budget at two sequences forced: is a tree step or a
plain step faster there once served? `PYTHONPATH=. python docs/results/session35/throwaway/forced_budgets.py
SECONDS ROUNDS [POLICY ...]` (held-out Alpaca tuning prompts, runs/alpaca_tune.json; 128 tokens, greedy). One process,
one generator per policy (loaded once), each served by uvicorn in turn (ABC, CBA, ...), two openai clients
for SECONDS; prints generated tokens/s (the streams' usage) per policy and round, and the budget "auto" chose."""

import statistics
import sys
import threading
import time

import openai
import uvicorn

import runtime
from runtime.bench import load_prompts
from runtime.serve import create_app

secs, rounds = float(sys.argv[1]), int(sys.argv[2])
BIG = 10**6
ALL = {"auto": "auto", "plain@2": [BIG, 1], "trees@2": [BIG, BIG], "6@2": [BIG, 6], "plain-server": "auto"}
# argv[3:]: the policies to run (default the first four; "plain-server": the plain server, medusa=False)
POLICIES = {k: ALL[k] for k in (sys.argv[3:] or list(ALL)[:4])}
gens = {k: runtime.load("artifacts/smollm2-135m-medusa", threads=2, max_batch=2, budgets=b, reuse_prefix=False)
        for k, b in POLICIES.items()}  # fmt: skip
prompts = [p.text for p in load_prompts("runs/alpaca_tune.json")]


def drive(url: str, first: int) -> float:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    stop, tokens = time.time() + secs, [0, 0]

    def worker(i: int) -> None:
        j = first + i
        while time.time() < stop:
            s = client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompts[j % len(prompts)]}],
                                               max_tokens=128, temperature=0, stream=True,
                                               stream_options={"include_usage": True})  # fmt: skip
            for chunk in s:
                if chunk.usage:
                    tokens[i] += chunk.usage.completion_tokens
            j += 2

    t0 = time.time()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(tokens) / (time.time() - t0)


results: dict[str, list[float]] = {k: [] for k in POLICIES}
port = 8031
for r in range(rounds):
    order = list(POLICIES) if r % 2 == 0 else list(reversed(POLICIES))
    for k in order:
        app = create_app(gens[k], "m", max_batch=2, max_queue=16, decode={"medusa": k != "plain-server", "tree": None})
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        th = threading.Thread(target=srv.run, daemon=True)
        th.start()
        while not srv.started:
            time.sleep(0.05)
        rate = drive(f"http://127.0.0.1:{port}", first=r * 40)
        srv.should_exit = True
        th.join()
        port += 1
        results[k].append(rate)
        chosen = {b: v[0] for b, v in gens[k].engine._budget_cache.items()} if k == "auto" else ""
        print(f"round {r} {k:>12} {rate:6.1f} tok/s {chosen}", flush=True)
ref = "plain-server" if "plain-server" in results else "plain@2"
base = statistics.median(results[ref])
for k, v in results.items():
    pairs = [x / y for x, y in zip(v, results[ref])]  # round by round: the same prompts
    print(
        f"{k:>12} median {statistics.median(v):6.1f} tok/s  vs {ref} {statistics.median(v) / base:.2f}x  "
        f"per round {' '.join(f'{x:.2f}' for x in pairs)}"
    )
