"""What the session-35 probes share (imported from the probes' own folder, which Python puts on sys.path):
generators loaded with and without ONNX Runtime's spinning stopped after each call, and one timed batch-engine call."""

import time

import runtime
import runtime.onnxrt as onnxrt
from runtime.batch import profile_requests

ARTIFACT = "artifacts/smollm2-135m-medusa"


def stopping(base):
    """``runtime.onnxrt._options`` with its spinning sessions' threads stopping when a call returns
    (session.force_spinning_stop), ``base`` being the shipped function."""

    def options(ort, threads, spin):
        opts = base(ort, threads, spin)
        if spin:
            opts.add_session_config_entry("session.force_spinning_stop", "1")
        return opts

    return options


def spin_and_stop(**load) -> dict:
    """{"spin": generator as shipped, "stop": generator whose spinning sessions stop spinning when a
    call returns}, both ``runtime.load(ARTIFACT, threads=2, **load)``."""
    base = onnxrt._options
    gens = {}
    try:
        for name, options in (("spin", base), ("stop", stopping(base))):
            onnxrt._options = options
            gens[name] = runtime.load(ARTIFACT, threads=2, **load)
    finally:
        onnxrt._options = base
    return gens


def timed_call(eng, seqs: int, rows: int, cached: int) -> float:
    """Seconds of one greedy step call of ``seqs`` sequences, ``rows`` tokens each, over ``cached``
    entries (the call BatchEngine.profile times)."""
    eng._len[:seqs] = [cached] * seqs
    reqs = profile_requests(seqs, rows, cached)
    t = time.perf_counter()
    eng._run_forward(reqs)
    return time.perf_counter() - t
