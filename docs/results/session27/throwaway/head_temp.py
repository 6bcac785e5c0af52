"""Coupled sampling: the heads' ranking temperature as a multiple s of the backbone's (s = 0: the heads' raw
ranking, no noise), on held-out Alpaca tuning prompts (`python -m scripts.heldout_prompts -o /tmp/alpaca_tune.json
--last 76 --drop-last 24`), T = 0.7, 192 tokens, seed = prompt index. Run from the repository root:
`PYTHONPATH=. python docs/results/session27/throwaway/head_temp.py 1.0,0.5,0 12 /tmp/alpaca_tune.json`
(output: head_temp.txt)."""

import sys
import time

from runtime import api
from runtime.bench import load_prompts
from runtime.decode import PositionNoise, perturbed

scales = [float(x) for x in sys.argv[1].split(",")]
n = int(sys.argv[2])
prompts_file = sys.argv[3]  # the held-out tuning prompts (the command in the docstring)
temp = float(sys.argv[4]) if len(sys.argv) > 4 else 0.7
S = {"s": 1.0}


def perturb(self, logits, temperature, pos):
    s = S["s"]
    if s == 0:
        return logits + 0 * self.at(pos)
    return perturbed(logits, self.at(pos), temperature * s)


PositionNoise.perturb = perturb
gen = api.load("artifacts/smollm2-135m-medusa", threads=2)
prompts = load_prompts(prompts_file)[:n]
ref = {}
for s in scales:
    S["s"] = s
    toks, secs, steps = 0, 0.0, 0
    same = 0
    for i, p in enumerate(prompts):
        t0 = time.perf_counter()
        g = gen.generate(p.text, max_new_tokens=192, temperature=temp, seed=i)
        secs += time.perf_counter() - t0
        toks += len(g.tokens)
        st = g.stats
        steps += st.steps
        if i in ref:
            same += ref[i] == g.tokens
        else:
            ref[i] = g.tokens
    print(
        f"s={s}: tokens {toks} steps {steps} accepted/step {toks / max(steps, 1):.3f} tok/s {toks / secs:.1f} same {same}/{len(prompts)}",
        flush=True,
    )
