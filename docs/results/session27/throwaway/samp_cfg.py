"""Exact (coupled) sampling at T = 0.7 against plain sampling, with the draft options varied (the defaults; no
context lookup; no datastore; the growing lookup), on held-out Alpaca tuning prompts, 192 tokens:
`PYTHONPATH=. python docs/results/session27/throwaway/samp_cfg.py 12 /tmp/alpaca_tune.json 192`
(output: samp_cfg.txt)."""

import sys
import time

from runtime import api
from runtime.bench import load_prompts

n = int(sys.argv[1])
gen = api.load("artifacts/smollm2-135m-medusa", threads=2)
prompts = load_prompts(sys.argv[2])[:n]
cfgs = {
    "plain": dict(medusa=False),
    "default": dict(),
    "lookup0": dict(lookup=0),
    "nodatastore": dict(datastore=False),
    "grow": dict(lookup_sizing="grow"),
}
res = {k: [0, 0.0, 0, 0] for k in cfgs}
for i, p in enumerate(prompts):
    for k, kw in cfgs.items():
        t0 = time.perf_counter()
        g = gen.generate(p.text, max_new_tokens=int(sys.argv[3]), temperature=0.7, seed=i, **kw)
        r = res[k]
        r[0] += len(g.tokens)
        r[1] += time.perf_counter() - t0
        r[2] += max(g.stats.steps, 1)
        r[3] += g.stats.nodes
base = res["plain"][0] / res["plain"][1]
for k, (t, s, st, nd) in res.items():
    print(f"{k:12s} tok/s {t / s:6.1f} x{t / s / base:.3f} acc {t / st:.2f} nodes/step {nd / st:.2f}")
