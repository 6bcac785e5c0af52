"""One call of N rows over 300 cached tokens, the lm_head screen (forward_argmax) against the float lm_head
(forward), median of 25 each, twice (session 33; the measurement that led to screen_max_rows).

    python docs/results/session33/throwaway/screen_vs_float_rows.py
"""

import time

import numpy as np

import runtime
from runtime.decode import prefill

gen = runtime.load("artifacts/smollm2-135m-medusa", threads=2)
backend = gen.backend
backend.screen_max_rows = None  # every call screened where asked (the artifact's profile may limit it)
prefill(backend, np.arange(300) % 1000 + 100, 0)


def median_ms(call, reps: int = 25) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
        backend.truncate(backend.cache_len)  # staged only: the cache stays at 300
    return float(np.median(times) * 1000)


for _round in range(2):
    for n in (1, 2, 4, 6, 8, 12):
        args = (np.arange(n) + 500, backend.cache_len + np.arange(n), np.tril(np.ones((n, n), bool)))
        f = median_ms(lambda a=args: backend.forward(*a))
        s = median_ms(lambda a=args: backend.forward_argmax(*a))
        print(f"n={n:2d} float {f:6.1f} ms  screen {s:6.1f} ms  screen/float {s / f:.3f}", flush=True)
