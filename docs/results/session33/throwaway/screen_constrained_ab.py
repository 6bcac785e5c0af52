"""Structured output with and without the lm_head screen, interleaved in one process (session 33).

    PYTHONPATH=. python docs/results/session33/throwaway/screen_constrained_ab.py artifacts/smollm2-135m-medusa [LIMIT]

The first LIMIT (16) MT-Bench first turns with scripts.bench_structured's schema and sentence, 256 tokens,
greedy: plain decoding and Medusa, each with the screen (constrained steps drawn through it since session
33) and without it (``backend.screens_argmax = False``: the float lm_head, masked, as before), the order
alternating by prompt; tokens checked identical. Prints tok/s summed over the prompts and the ratios.
"""

import json
import sys
import time
from pathlib import Path

import runtime
from scripts.bench_structured import ASK, SCHEMA

art = sys.argv[1]
limit = int(sys.argv[2]) if len(sys.argv) > 2 else 16
gen = runtime.load(art, threads=2)
fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA}}
rows = [json.loads(line) for line in open(Path(__file__).resolve().parents[5] / "shared/data/mt_bench_question.jsonl")]
prompts = [[{"role": "user", "content": r["turns"][0] + ASK}] for r in rows[:limit]]
tot = {k: [0, 0.0] for k in ("plain/float", "plain/screen", "medusa/float", "medusa/screen")}
fallbacks, same = 0, 0
backend = gen.backend
for i, msgs in enumerate(prompts):
    out = {}
    order = [True, False] if i % 2 else [False, True]
    for medusa in (False, True):
        for screen in order:
            backend.screens_argmax = screen
            before = backend.screen_fallbacks
            t = time.perf_counter()
            r = gen.generate(msgs, max_new_tokens=256, temperature=0, medusa=medusa, response_format=fmt)
            dt = time.perf_counter() - t
            key = f"{'medusa' if medusa else 'plain'}/{'screen' if screen else 'float'}"
            tot[key][0] += len(r.tokens)
            tot[key][1] += dt
            out[key] = r.tokens
            if screen:
                fallbacks += backend.screen_fallbacks - before
    same += len({tuple(v) for v in out.values()}) == 1
    print(i, {k: len(v) for k, v in out.items()}, flush=True)
backend.screens_argmax = True
rate = {k: n / s for k, (n, s) in tot.items()}
for k, v in rate.items():
    print(f"{k:14s} {v:7.2f} tok/s")
print(
    f"screen / float: plain {rate['plain/screen'] / rate['plain/float']:.3f}x, "
    f"medusa {rate['medusa/screen'] / rate['medusa/float']:.3f}x; Medusa / plain (screen) "
    f"{rate['medusa/screen'] / rate['plain/screen']:.3f}x; identical {same}/{len(prompts)}; "
    f"rows settled in float {fallbacks}"
)
