"""Single-sequence decoding with ONNX Runtime's spinning threads stopped when a call returns
(session.force_spinning_stop on every spinning session, patched in here) against spinning on (as before): two generators in one process,
each prompt run by both, order alternating; plain decoding and Medusa, greedy, tokens checked equal.
`PYTHONPATH=. python docs/results/session35/throwaway/stop_spinning_ab.py PROMPTS_FILE N MAX_NEW_TOKENS [SKIP]`
(the file's prompts SKIP .. SKIP + N - 1)."""

import statistics
import sys

from probe_common import spin_and_stop

from runtime.bench import _run, load_prompts

path, n, max_new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
skip = int(sys.argv[4]) if len(sys.argv) > 4 else 0
gens = spin_and_stop(reuse_prefix=False)
prompts = load_prompts(path, limit=skip + n)[skip:]
rates: dict = {(k, m): [] for k in gens for m in (False, True)}
tokens: dict = {k: 0 for k in rates}
seconds: dict = {k: 0.0 for k in rates}
same = 0
for i, p in enumerate(prompts):
    out = {}
    for k in list(gens) if i % 2 == 0 else list(reversed(gens)):
        gen = gens[k]
        ids = gen.encode([{"role": "user", "content": p.text}])
        for medusa in (False, True):
            r = _run(gen, ids, max_new, medusa=medusa)
            out[(k, medusa)] = r.tokens
            rates[(k, medusa)].append(len(r.tokens) / r.seconds)
            tokens[(k, medusa)] += len(r.tokens)
            seconds[(k, medusa)] += r.seconds
    same += len({tuple(t) for t in out.values()}) == 1
    print(f"{p.id:>5} " + "  ".join(f"{k}{' medusa' if m else ' plain'} {rates[(k, m)][-1]:6.1f}" for k, m in rates),
          flush=True)  # fmt: skip
for medusa in (False, True):
    a, b = (tokens[(k, medusa)] / seconds[(k, medusa)] for k in ("spin", "stop"))
    pairs = [y / x for x, y in zip(rates[("spin", medusa)], rates[("stop", medusa)])]
    print(f"{'medusa' if medusa else 'plain':>6}: spin {a:6.2f} tok/s, stop {b:6.2f} tok/s, stop / spin {b / a:.3f} "
          f"(per prompt median {statistics.median(pairs):.3f}, {sum(x > 1 for x in pairs)}/{len(pairs)} faster)")  # fmt: skip
print(f"identical (all four decoders): {same}/{len(prompts)}")
