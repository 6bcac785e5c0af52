"""Seeded sampling tokens of one code checkout (argv[1]) on an artifact (argv[2]), as JSON: run it from the
repository root for two checkouts and compare (session 24: old code on the old artifact against new code on the
old and the new one)."""

import json
import sys

sys.path.insert(0, sys.argv[1])
import runtime

gen = runtime.load(sys.argv[2], threads=2)
qs = [json.loads(line) for line in open("../shared/data/mt_bench_question.jsonl")][20:23]
out = []
for i, q in enumerate(qs):
    c = [{"role": "user", "content": q["turns"][0]}]
    for kw in ({"medusa": False}, {}, {"top_k": 20}):
        out.append(gen.generate(c, max_new_tokens=48, temperature=0.7, seed=i, **kw).tokens)
print(json.dumps(out))
