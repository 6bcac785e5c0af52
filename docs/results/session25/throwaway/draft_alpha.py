"""Accepted tokens a step of coupled exact sampling (T 0.7) against the noise weight the heads' drafts are
ranked with (head logits / T + alpha g): tokens are the same for every alpha (coupled sampling), so the
accepted length is exact, not timed. Run: python docs/results/session25/throwaway/draft_alpha.py ALPHAS...
on runs/alpaca_tune.json (python -m scripts.heldout_prompts -o runs/alpaca_tune.json --last 76 --drop-last 24),
with runtime/decode.py's draft_tree patched (not committed) to rank depth d by
noise.perturb(logits, temperature * alpha[d - 1], at + depth), alpha from MEDUSA_DRAFT_ALPHA="a1,a2,...": alpha
scales the draft temperature, so 0.01 ranks by the head's logits alone (top-k drafts) and alpha > 1 weighs the
noise more. Result (draft_alpha_sweep.txt, 2026-12-02 19:33): 1.617 accepted at alpha 1 (the shipped rule), 1.566
at 0.01, 1.593 at 0.5, 1.609 at 0.75, 1.594 at 1.5, 1.542 at 2: the shipped rule is the best of these (as
docs/results/coupled/pairs_final.txt found on MT-Bench with its c sweep)."""

import json
import os
import sys

import runtime

prompts = [
    r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "") for r in json.load(open("runs/alpaca_tune.json"))
][: int(os.environ.get("N", 24))]
gen = runtime.load("artifacts/smollm2-135m-medusa", threads=2)
temp = float(os.environ.get("T", 0.7))
lookup = int(os.environ.get("LOOKUP", 3))
ref = None
for alpha in sys.argv[1:]:
    os.environ["MEDUSA_DRAFT_ALPHA"] = alpha
    steps = toks = 0
    out = []
    for i, p in enumerate(prompts):
        g = gen.generate([{"role": "user", "content": p}], max_new_tokens=128, temperature=temp, seed=i, lookup=lookup)
        steps += g.stats.steps
        toks += g.stats.new_tokens - 1
        out.append(g.tokens)
    same = ref is None or out == ref
    ref = ref or out
    print(
        f"alpha {alpha}: {toks / steps:.3f} tokens a step ({toks} tokens, {steps} steps), tokens same as first: {same}",
        flush=True,
    )
