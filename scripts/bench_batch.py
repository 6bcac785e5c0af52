"""In-process throughput of batched decoding (``runtime.load(..., max_batch=N)``), no HTTP:
plain decoding against Medusa with each step-budget policy, the same prompts from N threads.

    python -m scripts.bench_batch artifacts/smollm2-135m-medusa --concurrency 8 --prompts 16 \\
        --max-new-tokens 128 --threads 2 --budgets none plain auto

``--budgets``: ``none`` (every step its full tree), ``plain`` (a budget of 1 token: every step
plain, through the Medusa loop), ``auto`` (the load-aware default). After each plain-decoding row,
the engine's cost of one call of one token a sequence by the number of sequences (its start-up
profile, as that row's calls updated it). ``--plain-steps in-place batch-graph``
runs every row twice: plain steps of several sequences in place on ``model.onnx`` (the default) and
on ``batch.onnx`` (``runtime.batch.PLAIN_STEPS_IN_PLACE = False``, the engine before 2026-12-01).
``--tree-steps fold batch-graph`` likewise for the other steps of 2 .. fold_max_batch sequences (trees):
on ``fold.onnx`` (the default where the artifact has it) or on ``batch.onnx`` (``runtime.batch.FOLD_STEPS
= False``); after each row, the engine's cost of one call of 4 tokens a sequence. Prints tokens/s over the wall
time, the engine's share of it, sequences per call, padding, mean accepted tokens per step, and
whether every answer equals plain decoding's.
"""

import argparse
import threading
import time
from pathlib import Path

from runtime.bench import load_prompts

ROOT = Path(__file__).resolve().parents[1]
POLICIES = {"none": None, "plain": [1], "auto": "auto"}


def run(gen, chats, concurrency: int, max_new: int, **kw) -> tuple[list, float]:
    out: list = [None] * len(chats)

    def worker(i):
        for j in range(i, len(chats), concurrency):
            out[j] = gen.generate(chats[j], max_new_tokens=max_new, **kw)

    t = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return out, time.perf_counter() - t


def stream_clients(gen, chats, clients: int, count: int, first: int = 0, medusa: bool = True,
                   max_new_tokens: int = 128) -> tuple[list[tuple[int, list[int]]], float]:  # fmt: skip
    """The load test's clients in process: ``clients`` threads each take the next of ``count`` requests (request
    i: ``chats[i % len(chats)]``, i from ``first``) until none is left, and stream its answer from ``gen``.
    Returns ``[(chat index, tokens)]`` in the order they finished, and the wall seconds (the probes of
    docs/results/session37/throwaway and session38/throwaway drive it)."""
    done: list[tuple[int, list[int]]] = []
    nxt, lock = [first], threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = nxt[0]
                if i >= first + count:
                    return
                nxt[0] += 1
            events = gen.stream(chats[i % len(chats)], max_new_tokens=max_new_tokens, medusa=medusa)
            got = [t for ev in events for t in ev.tokens]
            with lock:
                done.append((i % len(chats), got))

    t = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return done, time.perf_counter() - t


def main(argv=None) -> int:
    import runtime.batch as rb

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument(
        "--prompts-file",
        default=str(ROOT.parent / "shared/data/mt_bench_question.jsonl"),
        help="MT-Bench JSONL (first turns), JSONL with prompt, or an Alpaca JSON list",
    )
    ap.add_argument("--prompts", type=int, default=16, help="the file's first N prompts")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--budgets", nargs="+", choices=list(POLICIES), default=["none", "plain", "auto"])
    ap.add_argument(
        "--plain-steps",
        nargs="+",
        choices=["in-place", "batch-graph"],
        default=["in-place"],
        help="where plain steps of several sequences run (each row once per choice, alternating)",
    )
    ap.add_argument(
        "--tree-steps",
        nargs="+",
        choices=["fold", "batch-graph"],
        default=["fold"],
        help="where steps of 2 .. fold_max_batch sequences with trees run (each row once per choice)",
    )
    a = ap.parse_args(argv)
    if a.prompts < 1 or a.concurrency < 1:
        ap.error("--prompts and --concurrency must be >= 1")
    chats = [[{"role": "user", "content": p.text}] for p in load_prompts(a.prompts_file, limit=a.prompts)]
    print(f"{'decoding':<36} {'tok/s':>7} {'engine':>7} {'seq/call':>9} {'padding':>8} {'accepted':>9}  identical")
    rows = [
        (policy, where, tree) for policy in ["plain decoding", *a.budgets] for where in a.plain_steps
        for tree in a.tree_steps
    ]  # fmt: skip
    try:
        _rows(a, chats, rows)
    finally:
        rb.PLAIN_STEPS_IN_PLACE = True
        rb.FOLD_STEPS = True
    return 0


def _rows(a, chats, rows) -> None:
    import runtime
    import runtime.batch as rb

    reference = None
    for policy, where, tree in rows:
        rb.PLAIN_STEPS_IN_PLACE = where == "in-place"
        rb.FOLD_STEPS = tree == "fold"
        budgets = "auto" if policy == "plain decoding" else POLICIES[policy]
        gen = runtime.load(
            a.artifact, threads=a.threads, max_batch=a.concurrency, budgets=budgets, reuse_prefix=False
        )  # every policy prefills the same prompts whole
        try:
            medusa = policy != "plain decoding"
            gen.generate(chats[0], max_new_tokens=8, medusa=medusa)  # untimed: first-call allocations
            gen.engine.stats.update({k: 0 if isinstance(v, int) else 0.0 for k, v in gen.engine.stats.items()})
            out, seconds = run(gen, chats, a.concurrency, a.max_new_tokens, medusa=medusa)
            st = dict(gen.engine.stats)
            costs = dict(gen.engine.costs)  # the start-up profile, as the calls since updated it
        finally:
            gen.close()
        tokens = [o.tokens for o in out]
        reference = reference or tokens
        same = sum(x == y for x, y in zip(tokens, reference))
        label = policy if policy == "plain decoding" else f"medusa, budgets {policy}"
        label += f" ({where})" if len(a.plain_steps) > 1 else ""
        label += f" [{tree}]" if len(a.tree_steps) > 1 else ""
        print(f"{label:<36} {sum(map(len, tokens)) / seconds:7.1f} {st['engine_s'] / seconds:6.0%} "
              f"{st['sequences'] / max(1, st['calls']):9.2f} {st['padded_rows'] / max(1, st['rows']):8.2f} "
              f"{sum(o.stats.mean_accepted for o in out) / len(out):9.2f}  {same}/{len(out)}", flush=True)  # fmt: skip
        if policy == "plain decoding" and costs:  # what one call of one token a sequence costs here
            cells = sorted((b, t) for (b, n), t in costs.items() if n == 1)
            print(f"{'':<4}one token a sequence, ms a call: " + ", ".join(f"{b} seq {1000 * t:.1f}" for b, t in cells))
        if policy != "plain decoding" and costs:  # and of a small tree's step
            cells = sorted((b, t) for (b, n), t in costs.items() if n == 4)
            print(f"{'':<4}4 tokens a sequence, ms a call: " + ", ".join(f"{b} seq {1000 * t:.1f}" for b, t in cells))


if __name__ == "__main__":
    raise SystemExit(main())
