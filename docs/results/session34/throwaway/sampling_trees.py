"""Exact (coupled) sampling at T = 0.7 with the sampling tree varied, against plain sampling, on held-out Alpaca
tuning prompts (never MT-Bench), the configurations interleaved prompt by prompt:
`PYTHONPATH=. python docs/results/session34/throwaway/sampling_trees.py ARTIFACT runs/alpaca_tune.json 12 192 TREE...`
(`python -m scripts.heldout_prompts -o runs/alpaca_tune.json --last 76 --drop-last 24` writes the prompts).
Every Medusa answer is checked against plain sampling's tokens for the same seed."""

import sys
import time

from runtime import api
from runtime.bench import load_prompts

artifact, prompt_file, n, max_new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
trees = sys.argv[5:]
gen = api.load(artifact, threads=2)
prompts = load_prompts(prompt_file)[:n]
cfgs: dict[str, dict] = {"plain": dict(medusa=False), **{t: dict(tree=t) for t in trees}}
res = {k: [0, 0.0, 0, 0, 0] for k in cfgs}
for kw in cfgs.values():  # warm-up
    gen.generate(prompts[0].text, max_new_tokens=16, temperature=0.7, seed=0, **kw)
for i, p in enumerate(prompts):
    ref = None
    for k, kw in cfgs.items():
        t0 = time.perf_counter()
        g = gen.generate(p.text, max_new_tokens=max_new, temperature=0.7, seed=i, **kw)
        dt = time.perf_counter() - t0
        ref = g.tokens if ref is None else ref
        r = res[k]
        r[0] += len(g.tokens)
        r[1] += dt
        r[2] += max(g.stats.steps, 1)
        r[3] += g.stats.nodes
        r[4] += g.tokens == ref
base = res["plain"][0] / res["plain"][1]
for k, (t, s, st, nd, same) in res.items():
    print(f"{k:18s} tok/s {t / s:6.1f} x{t / s / base:.3f} acc {t / st:.2f} nodes/step {nd / st:.2f} same {same}/{n}")
