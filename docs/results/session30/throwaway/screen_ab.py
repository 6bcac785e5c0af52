"""Throwaway (session 30): plain greedy decoding with the lm_head screen on and off (backend.screens_argmax), interleaved
prompt by prompt, on this machine; tokens checked equal.   python docs/results/session30/throwaway/screen_ab.py ARTIFACT [N]"""

import sys
import time

import runtime
from runtime.bench import load_prompts

gen = runtime.load(sys.argv[1], threads=2, reuse_prefix=False)
n = int(sys.argv[2]) if len(sys.argv) > 2 else 6
tot = {True: [0, 0.0], False: [0, 0.0]}
same = 0
gen.generate(gen.encode([{"role": "user", "content": "Hello"}]), max_new_tokens=16, medusa=False)
for p in load_prompts("../shared/data/mt_bench_question.jsonl", limit=n):
    ids = gen.encode([{"role": "user", "content": p.text}])
    outs = {}
    for on in (True, False, True, False):
        gen.backend.screens_argmax = on
        t = time.perf_counter()
        out = gen.generate(ids, max_new_tokens=128, medusa=False)
        tot[on][0] += len(out.tokens)
        tot[on][1] += time.perf_counter() - t
        outs[on] = out.tokens
    same += outs[True] == outs[False]
    print(p.id, {k: round(v[0] / v[1], 1) for k, v in tot.items()}, flush=True)
on, off = (tot[k][0] / tot[k][1] for k in (True, False))
print(
    f"{n} prompts x2, 128 tokens, threads 2: screen on {on:.2f} tok/s, off {off:.2f} tok/s, on/off {on / off:.3f}; "
    f"identical {same}/{n}"
)
