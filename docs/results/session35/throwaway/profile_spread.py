"""How much the batch engine's start-up cost table moves between profiles, timed cell after cell (each cell's
repeats back to back, as BatchEngine.profile did) or interleaved (each repeat a pass over every cell):
`PYTHONPATH=. python docs/results/session35/throwaway/profile_spread.py PROFILES`. The engine serves 16 slots,
as the load test's servers do; prints the cells choose_budget weighs at two sequences, per profile and their spread."""

import statistics
import sys

import numpy as np
from probe_common import ARTIFACT, timed_call

import runtime
from runtime.batch import PROFILE_CACHED, PROFILE_ROWS

n_profiles = int(sys.argv[1])
gen = runtime.load(ARTIFACT, threads=2, max_batch=16, reuse_prefix=False)
eng = gen.engine


def interleaved(repeats: int = 3) -> dict:
    sizes = sorted({min(2**k, eng.slots) for k in range(eng.slots.bit_length() + 1)})
    rows = [n for n in PROFILE_ROWS if n <= eng.max_rows]
    cached = PROFILE_CACHED
    eng._ensure_capacity(cached + max(rows))
    cells = [(b, n) for b in sizes for n in rows]
    times: dict = {c: [] for c in cells}
    for rep in range(repeats + 1):
        for b, n in cells:
            seconds = timed_call(eng, b, n, cached)
            if rep:  # the first pass warms up
                times[(b, n)].append(seconds)
    eng._len[:] = [0] * eng.slots
    return {c: float(np.median(v)) for c, v in times.items()}


KEYS = [(1, 1), (2, 1), (2, 2), (2, 4), (2, 6), (2, 12), (4, 1), (4, 4)]
out: dict = {"sequential": [], "interleaved": []}
for i in range(n_profiles):
    for kind in ("sequential", "interleaved") if i % 2 == 0 else ("interleaved", "sequential"):
        costs = eng.profile() if kind == "sequential" else interleaved()
        out[kind].append(costs)
        print(f"{i} {kind:>11} " + " ".join(f"{b}x{n} {1000 * costs[(b, n)]:5.1f}" for b, n in KEYS), flush=True)
for kind, runs in out.items():
    for num, den in (((2, 4), (2, 1)), ((2, 12), (2, 1)), ((2, 1), (1, 1)), ((4, 4), (4, 1))):
        r = [c[num] / c[den] for c in runs]
        print(f"{kind:>11} {num[0]}x{num[1]} / {den[0]}x{den[1]}: median {statistics.median(r):.2f}, "
              f"range {min(r):.2f}-{max(r):.2f}, stdev {statistics.stdev(r):.3f}")  # fmt: skip
