"""Throwaway A/B (session 30): Medusa with the built-in cost model (the 2026-12-01 machine's profile) against
the same generator with this machine's measured latency profile, interleaved prompt by prompt, plain decoding
beside them; greedy tokens checked equal.

    python docs/results/session30/throwaway/cost_model_ab.py ARTIFACT PROFILE.json [N_PROMPTS]
"""

import sys
import time

import runtime
from runtime.bench import load_prompts
from runtime.dynamic import DEFAULT_COST, CostModel

art, prof = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 16
gen = runtime.load(art, threads=2, reuse_prefix=False)
measured = CostModel.from_profile(prof)
prompts = load_prompts("../shared/data/mt_bench_question.jsonl", limit=n)
tot = {"plain": [0, 0.0], "default cost": [0, 0.0], "measured cost": [0, 0.0]}
acc = {"default cost": [0, 0], "measured cost": [0, 0]}
same = {"default cost": 0, "measured cost": 0}
warm = gen.encode([{"role": "user", "content": "Hello"}])
gen.generate(warm, max_new_tokens=16)
for p in prompts:
    ids = gen.encode([{"role": "user", "content": p.text}])
    t = time.perf_counter()
    plain = gen.generate(ids, max_new_tokens=256, medusa=False)
    tot["plain"][0] += len(plain.tokens)
    tot["plain"][1] += time.perf_counter() - t
    for name, cm in (("default cost", DEFAULT_COST), ("measured cost", measured)):
        gen.__dict__["cost_model"] = cm
        t = time.perf_counter()
        out = gen.generate(ids, max_new_tokens=256)
        tot[name][0] += len(out.tokens)
        tot[name][1] += time.perf_counter() - t
        acc[name][0] += len(out.tokens)
        acc[name][1] += out.stats.steps
        same[name] += out.tokens == plain.tokens
    print(p.id, {k: round(v[0] / v[1], 1) for k, v in tot.items()}, flush=True)
base = tot["plain"][0] / tot["plain"][1]
print(f"{n} prompts, 256 tokens, threads 2; plain {base:.2f} tok/s")
for name in ("default cost", "measured cost"):
    r = tot[name][0] / tot[name][1]
    print(
        f"{name:14s} {r:.2f} tok/s = {r / base:.2f}x plain, {acc[name][0] / acc[name][1]:.2f} tokens a step, "
        f"identical {same[name]}/{n}"
    )
