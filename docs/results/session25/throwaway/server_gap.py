"""One client: Medusa / plain for one-sequence generate vs the batch engine (max_batch 16, what the server runs),
same process, same prompts (first 16 MT-Bench, 128 tokens, greedy), interleaved prompt by prompt; end to end (prefill in)."""

import json
import time

import runtime

art = "artifacts/smollm2-135m-medusa"
qs = [json.loads(l)["turns"][0] for l in open("../shared/data/mt_bench_question.jsonl")][:16]
one = runtime.load(art, threads=2, reuse_prefix=False)
bat = runtime.load(art, threads=2, reuse_prefix=False, max_batch=16)
t = {k: [] for k in ("one plain", "one medusa", "batch plain", "batch medusa")}
n = {k: 0 for k in t}
steps = {k: 0 for k in t}
for r in range(2):
    for q in qs:
        for name, gen in (("one", one), ("batch", bat)) if r == 0 else (("batch", bat), ("one", one)):
            for medusa in (False, True):
                k = f"{name} {'medusa' if medusa else 'plain'}"
                t0 = time.perf_counter()
                g = gen.generate([{"role": "user", "content": q}], max_new_tokens=128, medusa=medusa)
                t[k].append(time.perf_counter() - t0)
                n[k] += len(g.tokens)
                steps[k] += g.stats.steps
for k in t:
    print(f"{k:14s} {n[k] / sum(t[k]):7.2f} tok/s  {n[k] / max(steps[k], 1):.2f} tokens/step")
print(
    f"Medusa/plain: one-sequence {sum(t['one plain']) / sum(t['one medusa']):.2f}x, batch engine {sum(t['batch plain']) / sum(t['batch medusa']):.2f}x"
)
print(
    f"batch engine / one-sequence: plain {sum(t['one plain']) / sum(t['batch plain']):.2f}x, medusa {sum(t['one medusa']) / sum(t['batch medusa']):.2f}x"
)
bat.close() if hasattr(bat, "close") else None
