"""What a KV buffer kept between answers saves (runtime.backend.KEEP_CAPACITY), side by side.

    python -m scripts.bench_cache_keep artifacts/smollm2-135m-medusa --prompts ../shared/data/mt_bench_question.jsonl \
        --limit 8 --max-new-tokens 256 --rounds 2 --threads 2

One process, one loaded artifact. Each answer runs once with the buffer kept (the default) and
once with every answer starting from a fresh small buffer (``KEEP_CAPACITY = 0``, the behaviour
before 2026-12-02), the two alternated answer by answer (the order swapped each round), Medusa
and plain. Prints per setting the median time an answer spent growing its buffer (allocating a
larger one and copying the cached entries into it), the growths per answer and the tok/s over
all answers; the tokens must be the same either way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from scripts.common import add_ab_arguments


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_ab_arguments(p, limit=8, max_new_tokens=256, rounds=2)
    a = p.parse_args(argv)

    import runtime
    import runtime.backend
    from runtime.onnxrt import FusedOnnxRuntimeBackend
    from runtime.paths import read_text

    gen = runtime.load(a.artifact, backend="onnxruntime", device="cpu", threads=a.threads, reuse_prefix=False)
    if not isinstance(gen.backend, FusedOnnxRuntimeBackend):
        raise SystemExit(f"{a.artifact}: not a fused artifact (its buffer does not grow)")
    lines = [line for line in read_text(a.prompts).splitlines() if line.strip()][: a.limit]
    ids = [gen.encode([{"role": "user", "content": json.loads(line)["turns"][0]}]) for line in lines]
    grow_s: list[float] = []
    alloc = gen.backend._alloc

    def timed_alloc(size: int) -> None:  # the backend's own growth, timed
        t = time.perf_counter()
        alloc(size)
        grow_s.append(time.perf_counter() - t)

    gen.backend._alloc = timed_alloc
    keep = runtime.backend.KEEP_CAPACITY
    settings = {"kept": keep, "fresh": 0}
    rows: dict[tuple[str, bool], dict] = {(s, m): {"grow": [], "growths": 0, "n": 0, "secs": 0.0} for s in settings
                                          for m in (False, True)}  # fmt: skip
    tokens: dict[tuple[str, bool, int], list[int]] = {}
    gen.generate(ids[0], max_new_tokens=8)
    try:
        for r in range(a.rounds):
            for i, x in enumerate(ids):
                order = list(settings) if (r + i) % 2 == 0 else list(reversed(settings))
                for medusa in (False, True):
                    for s in order:
                        runtime.backend.KEEP_CAPACITY = settings[s]
                        gen.backend.reset()  # the buffer each setting starts its answer with
                        grow_s.clear()
                        t = time.perf_counter()
                        o = gen.generate(x, max_new_tokens=a.max_new_tokens, medusa=medusa)
                        row = rows[(s, medusa)]
                        row["secs"] += time.perf_counter() - t
                        row["n"] += len(o.tokens)
                        row["grow"].append(sum(grow_s))
                        row["growths"] += len(grow_s)
                        if tokens.setdefault((s, medusa, i), o.tokens) != o.tokens:
                            raise SystemExit(f"prompt {i}: different tokens between rounds")
    finally:
        runtime.backend.KEEP_CAPACITY = keep
    same = all(tokens[("kept", m, i)] == tokens[("fresh", m, i)] for m in (False, True) for i in range(len(ids)))
    answers = a.rounds * len(ids)
    print(f"{len(ids)} prompts x {a.rounds} rounds, max_new_tokens {a.max_new_tokens}, threads {a.threads}")
    print(f"{'decoding':<8} {'buffer':<7} {'grow ms/answer (median, max)':>30} {'growths/answer':>15} {'tok/s':>8}")
    for (s, medusa), row in rows.items():
        g = [1000 * x for x in row["grow"]]
        print(f"{'medusa' if medusa else 'plain':<8} {s:<7} {statistics.median(g):19.1f} {max(g):9.1f} "
              f"{row['growths'] / answers:15.2f} {row['n'] / row['secs']:8.2f}")  # fmt: skip
    for medusa in (False, True):
        k, f = rows[("kept", medusa)], rows[("fresh", medusa)]
        print(
            f"{'medusa' if medusa else 'plain'}: kept / fresh {(k['n'] / k['secs']) / (f['n'] / f['secs']):.3f}x tok/s"
        )
    print(f"tokens identical kept vs fresh: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
