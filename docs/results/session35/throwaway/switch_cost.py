"""What the batch engine's calls cost when consecutive calls change graphs: two sequences, a one-row call
(model.onnx in place) and a four-row call (fold.onnx), timed in runs of one kind (AAAA BBBB) and alternating
(ABAB): `PYTHONPATH=. python docs/results/session35/throwaway/switch_cost.py [nospin|stopspin|global]` ("nospin": every
backbone session without ONNX Runtime's spinning threads; "stopspin": session.force_spinning_stop, threads spin
while a call runs and stop when it returns; "global": one global thread pool of 2 threads shared by every session)."""

import statistics
import sys

from probe_common import ARTIFACT, stopping, timed_call

import runtime
import runtime.onnxrt as onnxrt

base = onnxrt._options
if "nospin" in sys.argv[1:]:
    onnxrt._options = lambda ort, threads, spin: base(ort, threads, False)
if "stopspin" in sys.argv[1:]:  # spinning while a call runs, stopped when it returns
    onnxrt._options = stopping(base)
if "global" in sys.argv[1:]:  # one thread pool for every session of the process (ONNX Runtime's global pools)
    import onnxruntime.capi._pybind_state as C

    C.set_global_thread_pool_sizes(2, 1)

    def _shared(ort, threads, spin):
        opts = base(ort, threads, spin)
        opts.use_per_session_threads = False
        return opts

    onnxrt._options = _shared
gen = runtime.load(ARTIFACT, threads=2, max_batch=16, reuse_prefix=False)
eng = gen.engine
cached = 128
eng._ensure_capacity(cached + 16)


def call(b: int, n: int) -> float:
    return 1000 * timed_call(eng, b, n, cached)


A, B = (2, 1), (2, 4)
for rep in range(3):
    runs = {"A after A": [], "B after B": [], "A after B": [], "B after A": []}
    call(*A)
    for _ in range(20):
        runs["A after A"].append(call(*A))
    call(*B)
    for _ in range(20):
        runs["B after B"].append(call(*B))
    for _ in range(20):
        runs["A after B"].append(call(*A))
        runs["B after A"].append(call(*B))
    print(f"{rep} {' '.join(sys.argv[1:]) or 'spin'}: " + "  ".join(f"{k} {statistics.median(v):5.1f} ms" for k, v in runs.items()),
          flush=True)  # fmt: skip
