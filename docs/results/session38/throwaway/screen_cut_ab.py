"""Greedy Medusa with the lm_head screen up to A rows against up to B rows, interleaved per prompt (session 38).

    python docs/results/session38/throwaway/screen_cut_ab.py artifacts/smollm2-135m-medusa 1 7 [LIMIT]

The first LIMIT (16) MT-Bench first turns, 256 tokens; each prompt: plain decoding, then Medusa with
``backend.screen_max_rows`` = A and = B, the order alternating by prompt; tokens checked identical.
"""

import sys
import time

import runtime
from runtime.bench import load_prompts

art, a, b = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
limit = int(sys.argv[4]) if len(sys.argv) > 4 else 16
gen = runtime.load(art, threads=2)
backend = gen.backend
print(f"screen_max_rows from the profile: {backend.screen_max_rows}")
chats = [
    [{"role": "user", "content": p.text}] for p in load_prompts("../shared/data/mt_bench_question.jsonl", limit=limit)
]
keys = ["plain", f"medusa/{a}", f"medusa/{b}"]
tot = {k: [0, 0.0, 0] for k in keys}
same = 0
gen.generate(chats[0], max_new_tokens=8)
for i, msgs in enumerate(chats):
    out = {}
    order = [a, b] if i % 2 == 0 else [b, a]
    for key, cut, medusa in [("plain", a, False)] + [(f"medusa/{c}", c, True) for c in order]:
        backend.screen_max_rows = cut
        t = time.perf_counter()
        r = gen.generate(msgs, max_new_tokens=256, temperature=0, medusa=medusa)
        tot[key][0] += len(r.tokens)
        tot[key][1] += time.perf_counter() - t
        tot[key][2] += r.stats.steps
        out[key] = r.tokens
    same += len({tuple(v) for v in out.values()}) == 1
rate = {k: n / s for k, (n, s, _) in tot.items()}
for k, (n, _s, steps) in tot.items():
    print(f"{k:12s} {rate[k]:7.2f} tok/s, {n / steps:.2f} tokens a step")
print(
    f"screen up to {b} / up to {a}: {rate[keys[2]] / rate[keys[1]]:.3f}x; Medusa / plain: {rate[keys[1]] / rate['plain']:.3f}x "
    f"({a}), {rate[keys[2]] / rate['plain']:.3f}x ({b}); identical {same}/{len(chats)}"
)
