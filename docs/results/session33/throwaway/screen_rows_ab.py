"""The lm_head screen on every call against the screen up to the profile's ``screen_max_rows``, greedy
Medusa, interleaved in one process (session 33).

    PYTHONPATH=. python docs/results/session33/throwaway/screen_rows_ab.py artifacts/smollm2-135m-medusa [LIMIT] [--schema]

The first LIMIT (16) MT-Bench first turns, 256 tokens, greedy; each prompt: our plain decoding, then
Medusa with ``backend.screen_max_rows`` as the artifact's latency profile sets it and with None (every
call screened, sessions 23-32), the order alternating by prompt; tokens checked identical. ``--schema``:
under scripts.bench_structured's schema and sentence. Prints tok/s summed over the prompts and ratios.
"""

import json
import sys
import time
from pathlib import Path

import runtime
from scripts.bench_structured import ASK, SCHEMA

art = sys.argv[1]
limit = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2].isdigit() else 16
schema = "--schema" in sys.argv
gen = runtime.load(art, threads=2)
backend = gen.backend
profile_rows = backend.screen_max_rows
fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA}} if schema else None
rows = [json.loads(line) for line in open(Path(__file__).resolve().parents[5] / "shared/data/mt_bench_question.jsonl")]
prompts = [[{"role": "user", "content": r["turns"][0] + (ASK if schema else "")}] for r in rows[:limit]]
print(f"screen_max_rows from the profile: {profile_rows}; {'under the schema' if schema else 'free text'}")
tot = {k: [0, 0.0, 0] for k in ("plain", "medusa/profile", "medusa/every call")}
same = 0
for i, msgs in enumerate(prompts):
    out = {}
    order = [profile_rows, None] if i % 2 else [None, profile_rows]
    runs = [("plain", profile_rows, False)] + [
        ("medusa/profile" if r == profile_rows else "medusa/every call", r, True) for r in order
    ]
    for key, rows_limit, medusa in runs:
        backend.screen_max_rows = rows_limit
        t = time.perf_counter()
        r = gen.generate(msgs, max_new_tokens=256, temperature=0, medusa=medusa, response_format=fmt)
        tot[key][0] += len(r.tokens)
        tot[key][1] += time.perf_counter() - t
        tot[key][2] += r.stats.steps
        out[key] = r.tokens
    same += len({tuple(v) for v in out.values()}) == 1
    print(i, len(out["plain"]), flush=True)
backend.screen_max_rows = profile_rows
rate = {k: n / s for k, (n, s, _) in tot.items()}
for k, (n, _s, steps) in tot.items():
    print(f"{k:18s} {rate[k]:7.2f} tok/s, {n / steps:.2f} tokens a step")
print(
    f"Medusa, screen up to {profile_rows} rows / every call screened: "
    f"{rate['medusa/profile'] / rate['medusa/every call']:.3f}x; Medusa / plain: "
    f"{rate['medusa/profile'] / rate['plain']:.3f}x (every call screened: {rate['medusa/every call'] / rate['plain']:.3f}x); "
    f"identical {same}/{len(prompts)}"
)
