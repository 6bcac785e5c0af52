"""Engine calls by kind at C concurrent streams (in process): count, mean ms, rows; greedy, 128 tokens,
first 16 MT-Bench first turns; plain then Medusa with every step its full tree (budgets None) then auto.
python docs/results/session25/throwaway/call_costs.py C [plain|none|hold|auto ...]"""

import collections
import json
import sys
import threading
import time

import numpy as np

import runtime
from runtime import batch

C = int(sys.argv[1])
qs = [json.loads(l)["turns"][0] for l in open("../shared/data/mt_bench_question.jsonl")][:16]
rec = []
orig = batch.BatchEngine._call_in_place


def timed(self, session, kind, lo, hi, feeds, reqs, n):
    t = time.perf_counter()
    out = orig(self, session, kind, lo, hi, feeds, reqs, n)
    rec.append(
        (
            kind,
            hi - lo,
            len(reqs),
            n,
            batch.SCREEN_INPUT in feeds and int(feeds[batch.SCREEN_INPUT][0]) > 0,
            time.perf_counter() - t,
        )
    )
    return out


batch.BatchEngine._call_in_place = timed
orig_h = batch.BatchEngine._run_heads


def th(self, reqs):
    t = time.perf_counter()
    orig_h(self, reqs)
    rec.append(("heads", len(reqs), len(reqs), 0, False, time.perf_counter() - t))


batch.BatchEngine._run_heads = th

CONF = {"plain": ("auto", False), "none": (None, True), "hold": ([1] * 16, True), "auto": ("auto", True)}
for label in sys.argv[2:] or ["plain", "none", "auto"]:
    budgets, medusa = CONF[label]
    gen = runtime.load("artifacts/smollm2-135m-medusa", threads=2, reuse_prefix=False, max_batch=16, budgets=budgets)
    rec.clear()
    it = iter(qs)
    lock = threading.Lock()
    ntok = [0]

    def client(gen=gen, it=it, lock=lock, ntok=ntok, medusa=medusa):
        while True:
            with lock:
                q = next(it, None)
            if q is None:
                return
            g = gen.generate([{"role": "user", "content": q}], max_new_tokens=128, medusa=medusa)
            with lock:
                ntok[0] += len(g.tokens)

    t0 = time.perf_counter()
    th_ = [threading.Thread(target=client) for _ in range(C)]
    [t.start() for t in th_]
    [t.join() for t in th_]
    wall = time.perf_counter() - t0
    agg = collections.defaultdict(list)
    for kind, _B, seqs, n, scr, s in rec:
        key = (kind, seqs, "prefill" if n > 16 else f"{n} rows", "screen" if scr else "")
        agg[key].append(s)
    busy = sum(s for *_, s in rec)
    print(f"{label}: {ntok[0] / wall:.1f} tok/s, engine busy {busy / wall:.0%} of {wall:.1f} s")
    for k, v in sorted(agg.items(), key=lambda kv: -sum(kv[1]))[:12]:
        print(f"   {str(k):45s} n={len(v):5d} mean {1e3 * np.mean(v):6.1f} ms  total {sum(v):6.2f} s")
    gen.close() if hasattr(gen, "close") else None
