"""Session 36 probe: coupled exact sampling at T = 0.7 with the shipped sampling tree (chain_1), cpu_8 and chain_2, and
plain sampling, first 8 MT-Bench prompts, 128 tokens, two rounds.  PYTHONPATH=. python THIS_FILE"""

import json
import time

import runtime

prompts = [json.loads(l)["turns"][0] for l in open("../shared/data/mt_bench_question.jsonl")][:8]
gen = runtime.load("artifacts/smollm2-135m-medusa", threads=2)
gen.generate(prompts[0], max_new_tokens=16, temperature=0.7, seed=1)
for rnd in range(2):
    for tree in (None, "cpu_8", "chain_2"):
        t0 = time.perf_counter()
        tok = steps = 0
        for i, p in enumerate(prompts):
            g = gen.generate(p, max_new_tokens=128, temperature=0.7, seed=i + 1, tree=tree)
            tok += len(g.tokens)
            steps += g.stats.steps
        dt = time.perf_counter() - t0
        print(
            f"round {rnd} tree {tree or 'chain_1 (shipped)'}: {tok / dt:.1f} tok/s, {tok / steps:.3f} tokens a step",
            flush=True,
        )
    t0 = time.perf_counter()
    tok = 0
    for i, p in enumerate(prompts):
        g = gen.generate(p, max_new_tokens=128, temperature=0.7, seed=i + 1, medusa=False)
        tok += len(g.tokens)
    print(f"round {rnd} plain sampling: {tok / (time.perf_counter() - t0):.1f} tok/s", flush=True)
