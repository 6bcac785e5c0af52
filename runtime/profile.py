"""Latency profile: the cost of verifying N new tokens against one plain step (N = 1).

This is the step-time model the tree selection uses (``medusa-train select-tree``): a
tree of N nodes pays ``relative_cost[N]`` plain steps per verification, plus
``heads_relative_cost`` for the one Medusa-heads call of each step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from runtime.backend import Backend
from runtime.decode import prefill

# every size up to 16 (a CPU's matrix kernels work in blocks of rows, e.g. 6: the cost rises in steps
# that interpolation between powers of two would blur), then sparser
DEFAULT_SIZES = (*range(1, 17), 20, 24, 32, 48, 64)
PROFILE_FILE = "latency_profile.json"


K = TypeVar("K", bound=Hashable)


def round_robin_ms(
    call: Callable[[K], object], sizes: Sequence[K], repeats: int, warmup: int, rng: np.random.Generator
) -> dict[K, float]:
    """Median milliseconds of ``call(n)`` per size n, after ``warmup`` untimed rounds.

    Round-robin, shuffled each round: load from other processes spreads over every size
    instead of skewing whichever size it happened to coincide with (N = 1 is every ratio's base).
    """
    samples: dict[K, list[float]] = {n: [] for n in sizes}
    keys = list(sizes)
    for r in range(warmup + repeats):
        for i in rng.permutation(len(keys)):
            n = keys[int(i)]
            t = time.perf_counter()
            call(n)
            if r >= warmup:
                samples[n].append(time.perf_counter() - t)
    return {n: float(np.median(samples[n]) * 1000) for n in sizes}


def screen_limit(screen_ms: dict[int, float], float_ms: dict[int, float]) -> int:
    """The row count L up to which calls go through the lm_head screen (calls of more rows through the
    float lm_head; 0: not even one row): the L that saves the most milliseconds summed over the measured
    sizes, ``sum(float_ms[n] - screen_ms[n] for n <= L)`` (the smallest such L on a tie).

    A sum, not the first size where the screen costs more: each size is one median, and where the two
    are within a few percent of each other a single noisy cell would otherwise cut off every size above it
    (session 38: two rows 0.26 ms dearer screened, three to seven 0.5-3.2 ms cheaper; cutting at one row
    made greedy Medusa 1.8-4.7% slower than screening up to seven, interleaved on the first 16 prompts)."""
    best, best_saved = 0, 0.0
    for n, saved in _screen_savings(screen_ms, float_ms):
        if saved > best_saved:
            best, best_saved = n, saved
    return best


def _screen_savings(screen_ms: dict, float_ms: dict) -> list[tuple[int, float]]:
    """``(n, milliseconds the screen saves summed over the sizes up to n)`` by size (keys: ints, or a profile
    file's strings)."""
    out, saved = [], 0.0
    for n in sorted(screen_ms, key=int):
        saved += float_ms[n] - screen_ms[n]
        out.append((int(n), saved))
    return out


def screen_summary(profile: dict) -> str:
    """One line on a profile that timed the lm_head screen beside the float lm_head: up to how many rows
    calls are screened (``screen_max_rows``) and the milliseconds that saves summed over the sizes."""
    cut = int(profile["screen_max_rows"])
    if cut == 0:
        return "lm_head screen: dearer than the float lm_head at every cut, not used (every call computes float logits)"
    saved = max(s for n, s in _screen_savings(profile["screen_ms"], profile["float_ms"]) if n <= cut)
    return (
        f"lm_head screen: calls of up to {cut} rows (saves {saved:.1f} ms summed over the sizes up to it; "
        "more rows: the float lm_head)"
    )


def fitting_cache(max_context: int, sizes: Sequence[int], cached: int) -> int:
    """The cached tokens a profile measures at: ``cached``, or fewer where the largest N would not fit."""
    return min(cached, max_context - max(sizes))


def profile_tree_sizes(
    backend: Backend,
    sizes: Sequence[int] = DEFAULT_SIZES,
    cached: int = 256,
    repeats: int = 7,
    warmup: int = 2,
    progress=None,
) -> dict:
    """Median time of one forward of N new tokens over ``cached`` cached tokens (:func:`fitting_cache`), per N."""
    cached = fitting_cache(backend.max_context, sizes, cached)
    rng = np.random.default_rng(0)
    vocab = backend.spec.vocab_size
    backend.reset()
    prompt = rng.integers(0, vocab, cached)
    prefill(backend, prompt, chunk=0, want_logits=False)  # in the calls the backend takes (its max_new_tokens)
    inputs = {
        n: (rng.integers(0, vocab, n), cached + np.arange(n), np.tril(np.ones((n, n), dtype=bool))) for n in sizes
    }
    # staged only: the cache stays at `cached`. Greedy steps' call: with the graph's lm_head screen
    # where the backend has one (runtime.backend.Backend.forward_argmax), timed beside the float lm_head
    # (interleaved): from some number of rows on the screen can cost more (its int8 product and top-k
    # per row), and calls of more rows than screen_max_rows then compute float logits
    screened = bool(getattr(backend, "screens_argmax", False))
    limit = getattr(backend, "screen_max_rows", None)
    extra: dict = {}
    if screened:
        backend.screen_max_rows = None  # every size through the screen while it is timed
        try:
            both = round_robin_ms(lambda key: (backend.forward_argmax if key[1] else backend.forward)(*inputs[key[0]]),
                                  [(n, kind) for n in sizes for kind in (True, False)], repeats, warmup, rng)  # fmt: skip
        finally:
            backend.screen_max_rows = limit
        screen_ms, float_ms = ({n: both[(n, kind)] for n in sizes} for kind in (True, False))
        cut = screen_limit(screen_ms, float_ms)
        ms = {n: screen_ms[n] if n <= cut else float_ms[n] for n in sizes}  # what a step of n rows costs then
        extra = {"screen_max_rows": cut, "screen_ms": {str(n): round(v, 3) for n, v in screen_ms.items()},
                 "float_ms": {str(n): round(v, 3) for n, v in float_ms.items()}}  # fmt: skip
    else:
        ms = round_robin_ms(lambda n: backend.forward(*inputs[n]), sizes, repeats, warmup, rng)
    if progress:
        for n in sizes:
            progress(n, ms[n])
    base = ms[min(sizes)]
    times: list[float] = []
    first: list[float] = []  # head 1 alone, where the backend has a graph of it (trees of depth 1)
    has_first = getattr(backend, "heads_first", None) is not None and backend.spec.medusa_head_type == "medusa"
    for r in range(warmup + repeats):  # the heads' call of a Medusa step (one position)
        # right after a backbone call, as in decoding: the heads' weights are no longer in the
        # CPU caches then (timing back-to-back heads calls reads ~40 % low on SmolLM2)
        backend.forward(rng.integers(0, vocab, 1), np.array([cached]), np.ones((1, 1), dtype=bool))
        t = time.perf_counter()
        if backend.spec.medusa_head_type == "hydra":  # one level's call (a tree of depth D makes D)
            K = backend.spec.num_medusa_heads
            backend.draft_logits(0, np.zeros((1, K), dtype=np.int64), np.ones(1, dtype=np.int64))
        else:
            backend.head_logits(0)
        if r >= warmup:
            times.append(time.perf_counter() - t)
        if has_first:
            backend.forward(rng.integers(0, vocab, 1), np.array([cached]), np.ones((1, 1), dtype=bool))
            t = time.perf_counter()
            backend.first_head_logits(0)
            if r >= warmup:
                first.append(time.perf_counter() - t)
    heads_ms = float(np.median(times) * 1000)
    if progress:
        progress("heads", heads_ms)
        if first:
            progress("head 1 alone", float(np.median(first) * 1000))
    if first:
        first_ms = float(np.median(first) * 1000)
        extra |= {"first_head_ms": round(first_ms, 3), "first_head_relative_cost": round(first_ms / base, 4)}
    return {
        "cached_tokens": cached,
        "repeats": repeats,
        "ms": {str(n): round(v, 3) for n, v in ms.items()},
        "relative_cost": {str(n): round(v / base, 4) for n, v in ms.items()},
        "heads_ms": round(heads_ms, 3),
        "heads_relative_cost": round(heads_ms / base, 4),
        "heads_kind": backend.spec.medusa_head_type,  # "hydra": the cost of one level (a call per depth)
        "lm_head": "screen" if screened else "float",  # how the timed calls computed the next tokens
        # first_head_ms: the call a tree of depth 1 makes (heads_int8_first.onnx); screen_max_rows,
        # screen_ms, float_ms: the screen against the float lm_head (ms: the cheaper by that limit)
        **extra,
    }


def format_peer_table(profile: dict) -> str:
    """Our step cost beside a peer's (``profile["peer"]``, runtime/peers.py), N by N."""
    peer = profile["peer"]
    head = f"{'N':>4} {'ours ms':>9} {'x N=1':>6}  {peer['name'] + ' ms':>12} {'x N=1':>6}  {'ours/peer':>9}"
    lines = [head, "-" * len(head)]
    for n, ms in profile["ms"].items():
        pm = peer["ms"][n]
        lines.append(
            f"{n:>4} {ms:9.2f} {profile['relative_cost'][n]:6.2f}  {pm:12.2f} "
            f"{peer['relative_cost'][n]:6.2f}  {ms / pm:9.2f}"
        )
    if peer["cached_tokens"] != profile["cached_tokens"]:
        lines.append(f"(the peer's cache held {peer['cached_tokens']} tokens, ours {profile['cached_tokens']})")
    if profile.get("lm_head") == "screen":  # not the same work: say so under the numbers
        rows = profile.get("screen_max_rows")
        which = "" if rows is None else f" of up to {rows} rows"
        lines.append(f"(ours: greedy steps' calls{which} through the lm_head screen, the argmax of each row; the "
                     "peer's compute every row's float logits)")  # fmt: skip
    return "\n".join(lines)


def write_profile(profile: dict, path: str | Path) -> Path:
    from runtime.paths import write_text_atomic

    return write_text_atomic(path, json.dumps(profile, indent=2) + "\n")
