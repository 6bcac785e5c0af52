"""Exact (coupled) sampling at 0.7 with other decode arguments, against plain sampling, one generator, interleaved
per prompt (plain first, then each variant, the same seed); every variant must give plain sampling's tokens.

    python docs/results/session37/throwaway/exact_variants.py 16 'chain_1={"tree":"chain_1"}' \\
        'max4={"tree":"chain_1","lookup_max":4}'
"""

import json
import sys
import time

import runtime
from runtime.bench import load_prompts


def main() -> None:
    limit = int(sys.argv[1])
    variants = {k: json.loads(v) for k, v in (a.split("=", 1) for a in sys.argv[2:])}
    g = runtime.load("artifacts/smollm2-135m-medusa", threads=2)
    chats = [
        [{"role": "user", "content": p.text}]
        for p in load_prompts("../shared/data/mt_bench_question.jsonl", limit=limit)
    ]
    g.generate(chats[0], max_new_tokens=8, temperature=0.7)  # untimed: first-call allocations
    tot = {k: [0, 0.0, 0, 0] for k in ["plain", *variants]}  # tokens, seconds, steps, verified
    for i, chat in enumerate(chats):
        t = time.perf_counter()
        plain = g.generate(chat, seed=i, max_new_tokens=256, temperature=0.7, medusa=False)
        tot["plain"][0] += len(plain.tokens)
        tot["plain"][1] += time.perf_counter() - t
        for name, kw in variants.items():
            t = time.perf_counter()
            r = g.generate(chat, seed=i, max_new_tokens=256, temperature=0.7, **kw)
            x = tot[name]
            x[1] += time.perf_counter() - t
            assert r.tokens == plain.tokens, (name, i)
            x[0] += len(r.tokens)
            x[2] += r.stats.steps
            x[3] += r.stats.nodes
    pt = tot["plain"][0] / tot["plain"][1]
    print(f"plain {pt:.2f}")
    for name in variants:
        n, s, steps, nodes = tot[name]
        print(f"{name}: {n / s:.2f} tok/s = {n / s / pt:.3f}x, accepted {n / steps:.3f}, verified {nodes / steps:.2f}")


if __name__ == "__main__":
    main()
