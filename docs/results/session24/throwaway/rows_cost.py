import time

import numpy as np

import runtime

gen = runtime.load("artifacts/smollm2-135m-medusa", threads=2)
b = gen.backend
V = b.spec.vocab_size
rng = np.random.default_rng(0)
n0 = 256
b.reset()
ids = rng.integers(0, V, n0)
b.forward(ids, np.arange(n0), np.tril(np.ones((n0, n0), bool)), logits=0)
b.commit(np.arange(n0))
for R in (1, 2, 4, 6, 8, 12, 16, 24):
    ids = rng.integers(0, V, R)
    pos = n0 + np.arange(R)
    mask = np.tril(np.ones((R, R), bool))
    g = -np.log(rng.standard_exponential((R, V))).astype(np.float32) * 0.7
    t = {"float": [], "screen": [], "screen_noise": []}
    for _rep in range(15):
        for k in t:
            s = time.perf_counter()
            if k == "float":
                b._run(ids, pos, mask, R, 0)
            elif k == "screen":
                b._run(ids, pos, mask, 0, R)
            else:
                b._run(ids, pos, mask, 0, R, g)
            t[k].append(time.perf_counter() - s)
    print(R, {k: round(1000 * float(np.median(v)), 2) for k, v in t.items()})
