"""scripts.bench_batch's rows in an interleaved order (Medusa with the load-aware budgets, plain decoding, Medusa with
every step plain; twice), so that the machine's drift falls on all of them alike.

    python docs/results/session37/throwaway/bench_batch_interleaved.py 16 32   # concurrency, prompts
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))

import scripts.bench_batch as bb
from runtime.bench import load_prompts


def main() -> None:
    a = argparse.Namespace(artifact="artifacts/smollm2-135m-medusa", threads=2, concurrency=int(sys.argv[1]),
                           max_new_tokens=128, plain_steps=["in-place"], tree_steps=["fold"])  # fmt: skip
    chats = [
        [{"role": "user", "content": p.text}]
        for p in load_prompts("../shared/data/mt_bench_question.jsonl", limit=int(sys.argv[2]))
    ]
    rows = [("auto", "in-place", "fold"), ("plain decoding", "in-place", "fold"), ("plain", "in-place", "fold")] * 2
    bb._rows(a, chats, rows)


if __name__ == "__main__":
    main()
