"""Where the batch engine stands under a two-sequence load, in one process: served (create_app on uvicorn, two
streaming openai clients from drive.py for 30 s) or streamed directly (two threads for 30 s); then the engine's host
seconds per sequence, the budget it chose at 2 sequences, its cost table, and choose_budget's estimate per budget
(read as the engine read it then: no monotone_costs; this ran before it):
`PYTHONPATH=. python docs/results/session34/throwaway/probe_host.py server|inproc` (prompts: runs/alpaca_tune.json).
Output: budget_probe.txt."""

import collections
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import uvicorn

import runtime
from runtime.bench import load_prompts
from runtime.serve import create_app

mode = sys.argv[1]
gen = runtime.load("artifacts/smollm2-135m-medusa", threads=2, max_batch=2)
eng = gen.engine
prompts = [p.text for p in load_prompts("runs/alpaca_tune.json")][:16]
if mode == "server":
    app = create_app(gen, "m", max_batch=2, max_queue=16, decode={"medusa": True, "tree": None})
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=8021, log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    while not srv.started:
        time.sleep(0.05)
    subprocess.run([sys.executable, str(Path(__file__).with_name("drive.py")), "http://127.0.0.1:8021", "2", "30"])
else:
    stop = time.time() + 30

    def worker(i: int) -> None:
        j = i
        while time.time() < stop:
            for _ in gen.stream([{"role": "user", "content": prompts[j % 16]}], max_new_tokens=128):
                pass
            j += 2

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
host = {k: round(v * 1000, 2) for k, v in eng.host.items()}
print(mode, "host ms/seq", host, "budgets", {k: v[0] for k, v in eng._budget_cache.items()}, "stats", eng.stats)
steps = list(eng._steps)
print("steps rows hist", collections.Counter(r for r, _ in steps).most_common(8))
print("costs", {f"{b}x{n}": round(1000 * t, 1) for (b, n), t in sorted(eng.costs.items()) if b <= 2})
rows = np.array([r for r, _ in steps])
tokens = np.array([t for _, t in steps], float)
tree = int(rows[rows > 1].min())
tree_tokens = float(tokens[rows == tree].mean())
print(f"steps {len(steps)} tree {tree} tree_tokens {tree_tokens:.2f} mean tokens all {tokens.mean():.2f}")
for busy in (1, 2):
    profiled = sorted(n for s, n in eng.costs if s == busy)
    for c in sorted({1, *rows.tolist()}):
        r = np.where(rows <= c, rows, tree if c >= tree else 1)
        t = np.where(rows <= c, tokens, tree_tokens if c >= tree else 1.0)
        values, counts = np.unique(r, return_counts=True)
        p_max = np.diff(np.r_[0.0, (np.cumsum(counts) / len(r)) ** busy])
        cost = sum(
            p * eng.costs[(busy, next((n for n in profiled if n >= v), profiled[-1]))] for v, p in zip(values, p_max)
        )
        cost += busy * (eng.host.get("plain" if c == 1 else "tree") or 0.0)
        print(
            f"busy {busy} c {c:2d} tok/step {t.mean():.2f} cost {1000 * cost:.1f} ms rate {busy * t.mean() / cost:.1f}"
        )
