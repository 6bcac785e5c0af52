"""Plain int4 decoding with and without the pad row of runtime.onnxrt.row_invariant_rows, alternated.
Usage (from the repository root): python docs/results/session31/throwaway/pad_ab.py ARTIFACT"""

import json
import statistics
import sys

import runtime
import runtime.onnxrt as o

art = sys.argv[1]
prompts = [json.loads(l)["turns"][0] for l in open("../shared/data/mt_bench_question.jsonl")][:4]
res = {}
for rows in (2, 1, 2, 1):
    o.row_invariant_rows = lambda cfg, r=rows: r
    import runtime.api as api

    if hasattr(api, "row_invariant_rows"):
        api.row_invariant_rows = o.row_invariant_rows
    gen = runtime.load(art, threads=2)
    gen.generate([{"role": "user", "content": "hi"}], max_new_tokens=8, medusa=False)
    t = 0
    n = 0
    for p in prompts:
        g = gen.generate([{"role": "user", "content": p}], max_new_tokens=128, medusa=False)
        t += g.stats.decode_s
        n += g.stats.new_tokens
    res.setdefault(rows, []).append(n / t)
    print(rows, round(n / t, 2), getattr(gen.backend, "min_rows", None), flush=True)
    gen.close()
print(
    {k: [round(x, 2) for x in v] for k, v in res.items()},
    "pad/no-pad",
    round(statistics.median(res[2]) / statistics.median(res[1]), 3),
)
