"""A/B of two artifacts that differ in their datastore.npz: exact (coupled) sampling at one temperature
against plain sampling, interleaved per prompt (plain, A, B), the same seed for all three.

    python docs/results/session37/ab_exact.py OLD_ARTIFACT NEW_ARTIFACT --limit 16 --temperature 0.7
"""

import argparse
import statistics
import time

import runtime
from runtime.bench import load_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--prompts", default="../shared/data/mt_bench_question.jsonl")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--tree", default="chain_1")
    a = ap.parse_args()
    gens = {"A": runtime.load(a.a, threads=2), "B": runtime.load(a.b, threads=2)}
    chats = [[{"role": "user", "content": p.text}] for p in load_prompts(a.prompts, limit=a.limit)]
    kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature)
    for g in gens.values():  # untimed: first-call allocations
        g.generate(chats[0], max_new_tokens=8, **{k: v for k, v in kw.items() if k != "max_new_tokens"})
    tot = {k: [0, 0.0, 0, 0, 0] for k in ("plain", "A", "B")}  # tokens, seconds, steps, datastore accepted, same
    ratios = {"A": [], "B": []}
    for i, chat in enumerate(chats):
        t = time.perf_counter()
        plain = gens["A"].generate(chat, seed=i, medusa=False, **kw)
        tp = time.perf_counter() - t
        tot["plain"][0] += len(plain.tokens)
        tot["plain"][1] += tp
        for name in ("A", "B"):
            t = time.perf_counter()
            r = gens[name].generate(chat, seed=i, acceptance="exact", tree=a.tree, **kw)
            s = time.perf_counter() - t
            st = tot[name]
            st[0] += len(r.tokens)
            st[1] += s
            st[2] += r.stats.steps
            st[3] += r.stats.datastore_accepted
            st[4] += r.tokens == plain.tokens
            ratios[name].append((len(r.tokens) / s) / (len(plain.tokens) / tp))
        print(f"prompt {i}: plain {len(plain.tokens) / tp:.1f} tok/s, A x{ratios['A'][-1]:.2f}, B x{ratios['B'][-1]:.2f}",
              flush=True)  # fmt: skip
    pt = tot["plain"][0] / tot["plain"][1]
    print(f"\nplain sampling {pt:.2f} tok/s ({len(chats)} prompts, T = {a.temperature}, tree {a.tree})")
    for name, path in (("A", a.a), ("B", a.b)):
        n, s, steps, ds, same = tot[name]
        print(f"{name} ({path}): exact {n / s:.2f} tok/s = {n / s / pt:.3f}x plain sampling (median per prompt "
              f"{statistics.median(ratios[name]):.3f}x), {n / steps:.3f} accepted/step, datastore tokens/step "
              f"{ds / steps:.3f}, {same}/{len(chats)} equal to plain sampling")  # fmt: skip


if __name__ == "__main__":
    main()
