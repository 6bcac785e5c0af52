"""The batch engine's lm_head screen on and off, alternated in one process (a throwaway A/B, session 24):
1 and 4 concurrent greedy sequences, plain and Medusa (load-aware budgets), MT-Bench prompts 17-32, 96 tokens."""

import json
import threading
import time

import runtime

g = runtime.load("artifacts/smollm2-135m-medusa", threads=2, max_batch=4)
e = g.engine
qs = [json.loads(line) for line in open("../shared/data/mt_bench_question.jsonl")]
prompts = [[{"role": "user", "content": q["turns"][0]}] for q in qs[16:32]]


def run(batch, medusa):
    out = [None] * len(batch)

    def go(i, p):
        out[i] = g.generate(p, max_new_tokens=96, medusa=medusa)

    ts = [threading.Thread(target=go, args=(i, p)) for i, p in enumerate(batch)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


res: dict = {}
toks: dict = {}
for rnd in range(2):
    for screen in (True, False) if rnd % 2 == 0 else (False, True):
        e.screens = e.screens_noise = screen
        for conc in (1, 4):
            for medusa in (False, True):
                key = (conc, medusa, screen)
                n, s = res.get(key, (0, 0.0))
                for j in range(0, 8, conc):
                    t = time.perf_counter()
                    out = run(prompts[j : j + conc], medusa)
                    s += time.perf_counter() - t
                    n += sum(len(o.tokens) for o in out)
                    toks.setdefault((conc, medusa, screen, j), [o.tokens for o in out])
                res[key] = (n, s)
for conc in (1, 4):
    for medusa in (False, True):
        on, off = (res[(conc, medusa, x)][0] / res[(conc, medusa, x)][1] for x in (True, False))
        print(
            f"{conc} clients {'medusa' if medusa else 'plain '}: screen {on:7.2f} tok/s, float {off:7.2f}, x{on / off:.3f}"
        )
same = all(toks[(c, m, True, j)] == toks[(c, m, False, j)] for (c, m, s, j) in toks if s)
print("identical", same, {k: v for k, v in e.stats.items() if "screen" in k})
