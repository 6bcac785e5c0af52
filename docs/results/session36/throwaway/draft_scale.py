"""Session 36 probe: accepted tokens a step of coupled exact sampling (T = 0.7) on the first N MT-Bench prompts,
with the heads' drafts ranked by ``logits / (T s) + g`` for each scale s (s = 1: the runtime's rule). Heads that
learned sampled answers model the tempered distribution already, so s = 1/T may rank them better.

    PYTHONPATH=. python docs/results/session36/throwaway/draft_scale.py ARTIFACT N S [S ...]   # TREE=chain_2: that tree
"""

import json
import os
import sys
import time

import runtime
from runtime import decode

art, n, scales = sys.argv[1], int(sys.argv[2]), [float(s) for s in sys.argv[3:]]
prompts = [json.loads(line)["turns"][0] for line in open("../shared/data/mt_bench_question.jsonl")][:n]
gen = runtime.load(art, threads=2)
original = decode.PositionNoise.perturb
for s in scales:
    decode.PositionNoise.perturb = lambda self, logits, t, pos, s=s: original(self, logits, t * s, pos)
    steps = tokens = 0
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        g = gen.generate(p, max_new_tokens=128, temperature=0.7, seed=i + 1, tree=os.environ.get("TREE"))
        steps += g.stats.steps
        tokens += len(g.tokens)
    print(
        f"{art} {os.environ.get('TREE', '')} s={s}: {tokens / max(steps, 1):.3f} tokens a step ({tokens} tokens, {steps} steps, "
        f"{time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
decode.PositionNoise.perturb = original
