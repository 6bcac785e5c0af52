import json
import threading
import time

import runtime

g = runtime.load("artifacts/smollm2-135m-medusa", threads=2, max_batch=4, budgets=None)
e = g.engine
qs = [json.loads(l) for l in open("../shared/data/mt_bench_question.jsonl")]
prompts = [[{"role": "user", "content": q["turns"][0]}] for q in qs[16:32]]
orig = e._screens
mode = ["screen"]
e._screens = lambda kind, reqs: orig(kind, reqs) if (kind != "fold" or mode[0] == "screen") else False


def run(batch):
    out = [None] * len(batch)

    def go(i, p):
        out[i] = g.generate(p, max_new_tokens=96)

    ts = [threading.Thread(target=go, args=(i, p)) for i, p in enumerate(batch)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    return out


res = {"screen": [0, 0.0], "float": [0, 0.0]}
toks = {}
for rnd in range(2):
    for k in ["screen", "float"] if rnd % 2 == 0 else ["float", "screen"]:
        mode[0] = k
        for j in range(0, 16, 4):
            t = time.perf_counter()
            out = run(prompts[j : j + 4])
            res[k][1] += time.perf_counter() - t
            res[k][0] += sum(len(o.tokens) for o in out)
            toks.setdefault((k, j), [o.tokens for o in out])
for k, (n, s) in res.items():
    print(k, round(n / s, 2), "tok/s")
print("identical", all(toks[("screen", j)] == toks[("float", j)] for j in range(0, 16, 4)), e.stats)
