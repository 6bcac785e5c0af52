"""Two in-process streams under a fixed step budget (plain, or Medusa with budgets [no limit, B]): tokens/s and
where a step's time goes (the engine's call stats, the decode loop's phase clock), session 39.

    python docs/results/session39/throwaway/budget_breakdown.py plain 2 3
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

for policy in sys.argv[1:]:
    budgets = "auto" if policy == "plain" else [8192, int(policy)]
    gen = runtime.load("artifacts/smollm2-135m-medusa", threads=2, max_batch=2, budgets=budgets, reuse_prefix=False)
    medusa = policy != "plain"
    gen.generate(chats[0], max_new_tokens=8, medusa=medusa)
    eng = gen.engine
    eng.stats.update({k: 0 if isinstance(v, int) else 0.0 for k, v in eng.stats.items()})
    out, wall = run_batch(gen, chats, 2, 128, medusa=medusa)
    steps = sum(o.stats.steps for o in out)
    tokens = sum(len(o.tokens) for o in out)
    times: dict[str, float] = {}
    for o in out:
        for k, v in o.stats.times.items():
            times[k] = times.get(k, 0.0) + v
    st = eng.stats
    print(
        f"{policy}: {tokens / wall:.1f} tok/s, {tokens / steps:.2f} tokens a step, {1000 * wall / (steps / 2):.1f} ms a step (2 seqs)"
    )
    print("  engine:", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in st.items()})
    print("  per-seq phase ms a step:", {k: round(1000 * v / steps, 2) for k, v in times.items()})
    print("  host ms a sequence:", {k: round(1000 * v, 3) for k, v in eng.host.items()})
    gen.close()
