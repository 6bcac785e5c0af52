"""Two in-process streams (runtime.load(..., max_batch=2)), plain decoding against Medusa under fixed step budgets
(tokens a sequence may verify a step when two decode; alone: no limit), the first 16 MT-Bench prompts, 128 tokens,
every row twice in the order given then reversed (session 38).

    python docs/results/session38/throwaway/fixed_budgets_c2.py plain 1 3 4 6 none
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))  # the repository: scripts.bench_batch

import runtime
from runtime.bench import load_prompts
from scripts.bench_batch import run as run_batch

chats = [
    [{"role": "user", "content": p.text}] for p in load_prompts("../shared/data/mt_bench_question.jsonl", limit=16)
]


def run(policy: str) -> tuple[float, float, list]:
    budgets = "auto" if policy in ("plain", "auto") else None if policy == "none" else [8192, int(policy)]
    gen = runtime.load("artifacts/smollm2-135m-medusa", threads=2, max_batch=2, budgets=budgets, reuse_prefix=False)
    try:
        medusa = policy != "plain"
        gen.generate(chats[0], max_new_tokens=8, medusa=medusa)
        out, wall = run_batch(gen, chats, 2, 128, medusa=medusa)  # scripts.bench_batch's client threads
    finally:
        gen.close()
    steps = sum(o.stats.steps for o in out)
    tokens = sum(len(o.tokens) for o in out)
    return tokens / wall, tokens / steps, [o.tokens for o in out]


policies = sys.argv[1:]
rates: dict[str, list[float]] = {p: [] for p in policies}
ref = None
for p in policies + policies[::-1]:
    rate, per_step, toks = run(p)
    ref = ref or toks
    rates[p].append(rate)
    print(f"{p:>6}: {rate:6.1f} tok/s, {per_step:.2f} tokens a step, identical {sum(a == b for a, b in zip(toks, ref))}/16",
          flush=True)  # fmt: skip
base = sum(rates["plain"]) / 2 if "plain" in rates else None
for p, r in rates.items():
    m = sum(r) / len(r)
    print(f"{p:>6}: mean {m:6.1f} tok/s" + (f" = {m / base:.3f}x plain" if base else ""))
