"""The batch budgets reading the cost table monotone (runtime.batch.monotone_costs) against reading it raw, in one
process, interleaved: 16 held-out Alpaca prompts at 128 tokens from 2 and 4 threads, Medusa (budgets="auto") and plain,
two rounds, raw first in round 0 (FIRST 0) or round 1 (FIRST 1): `PYTHONPATH=. python
docs/results/session34/throwaway/monotone_ab.py ARTIFACT runs/alpaca_tune.json FIRST`.
Output: monotone_ab.txt. Needs runtime.batch.monotone_costs, which commit 6a21b79 added and the next commit
reverted on this measurement: run it on 903da7b."""

import sys

import runtime
import runtime.batch as rb
from runtime.bench import load_prompts
from scripts import bench_batch

real = rb.monotone_costs
gen = runtime.load(sys.argv[1], threads=2, max_batch=4)
prompts = [p.text for p in load_prompts(sys.argv[2], limit=16)]
chats = [[{"role": "user", "content": p}] for p in prompts]


def run(concurrency: int, medusa: bool) -> tuple[float, list]:
    results, seconds = bench_batch.run(gen, chats, concurrency, 128, medusa=medusa)
    out = [r.tokens for r in results]
    return sum(len(o) for o in out) / seconds, out


run(2, True)  # warm-up: the engine's budgets have steps to weigh
totals: dict = {}
for rnd in range(2):
    for c in (2, 4):
        plain, ref = run(c, False)
        totals.setdefault((c, "plain"), []).append(plain)
        order = (("raw", lambda costs: costs), ("monotone", real))
        for name, fn in order if rnd % 2 == int(sys.argv[3]) else order[::-1]:
            rb.monotone_costs = fn
            gen.engine._budget_cache.clear()
            rate, out = run(c, True)
            totals.setdefault((c, name), []).append(rate)
            print(
                f"round {rnd} c={c} {name:8s} {rate:6.1f} tok/s  plain {plain:6.1f}  x{rate / plain:.2f}  "
                f"identical {sum(a == b for a, b in zip(out, ref))}/{len(ref)}",
                flush=True,
            )
        rb.monotone_costs = real
for c in (2, 4):
    p = sum(totals[(c, "plain")])
    print(
        f"c={c}: raw x{sum(totals[(c, 'raw')]) / p:.3f}, monotone x{sum(totals[(c, 'monotone')]) / p:.3f} (sums over rounds)"
    )
