"""Print the batch engine's start-up cost table (ms a call by sequences x rows each) next to the
one-sequence latency profile of the same total rows, so the per-sequence part of a batched call shows.

    python docs/results/session38/throwaway/engine_costs.py artifacts/smollm2-135m-medusa 8 2
"""

import json
import sys
from pathlib import Path

import runtime
from runtime.batch import PROFILE_CACHED

art, slots, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
gen = runtime.load(art, threads=threads, max_batch=slots, budgets="auto")
costs = gen.engine.profile(rows=[1, 2, 4, 6, 8], repeats=5)
gen.close()
single = json.loads((Path(art) / "latency_profile.json").read_text())["ms"]
print(f"cached {PROFILE_CACHED}; ms a call; [one sequence with the same total rows, latency_profile.json]")
for (b, n), t in sorted(costs.items()):
    total = b * n
    ref = single.get(str(total))
    print(
        f"{b} seq x {n} rows: {1000 * t:7.1f}  [{ref if ref is not None else '-'}]  per token row {1000 * t / total:5.1f}"
    )
