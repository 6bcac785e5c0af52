"""The batch engine (what `medusa-run serve` runs) with ONNX Runtime's spinning threads stopped when a call returns
(session.force_spinning_stop on every spinning session, patched in here) against spinning on (as before), in one process: two batched generators
(max_batch 8), the same held-out prompts from C client threads, plain decoding then Medusa, the two settings in
alternating order at each level: `PYTHONPATH=. python docs/results/session35/throwaway/stop_spinning_batch_ab.py
PROMPTS_FILE N MAX_NEW_TOKENS C [C ...]`."""

import sys

from probe_common import spin_and_stop

from runtime.bench import load_prompts
from scripts import bench_batch

path, n, max_new, levels = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), [int(c) for c in sys.argv[4:]]
gens = spin_and_stop(max_batch=8, reuse_prefix=False)
chats = [[{"role": "user", "content": p.text}] for p in load_prompts(path, limit=n)]
for gen in gens.values():  # warm-up: the budgets have steps to weigh
    bench_batch.run(gen, chats[:2], 2, 32, medusa=True)
rows = {}
for i, c in enumerate(levels):
    ref = None
    for k in list(gens) if i % 2 == 0 else list(reversed(gens)):
        for medusa in (False, True):
            results, seconds = bench_batch.run(gens[k], chats, c, max_new, medusa=medusa)
            out = [r.tokens for r in results]
            ref = ref or out
            rows[(c, k, medusa)] = sum(len(o) for o in out) / seconds
            same = sum(a == b for a, b in zip(out, ref))
            print(f"c={c} {k} {'medusa' if medusa else 'plain '} {rows[(c, k, medusa)]:6.1f} tok/s  identical "
                  f"{same}/{len(ref)}", flush=True)  # fmt: skip
print("\n  c  spin plain  spin medusa  stop plain  stop medusa  medusa/plain spin  stop  stop/spin plain  medusa")
for c in levels:
    sp, sm, tp, tm = (rows[(c, k, m)] for k in ("spin", "stop") for m in (False, True))
    print(f"{c:>3} {sp:11.1f} {sm:12.1f} {tp:11.1f} {tm:12.1f} {sm / sp:17.2f}x {tm / tp:5.2f}x {tp / sp:15.2f}x "
          f"{tm / sm:7.2f}x")  # fmt: skip
