"""C plain (or Medusa) streams of 128 tokens in one process on runtime.load(..., max_batch=C): tokens/s, and where
a round of the engine goes (engine seconds a call, sequences a call, calls a second).

    python docs/results/session38/throwaway/streams_stats.py 8 4 plain
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))  # the repository: scripts.bench_batch

import runtime
from runtime.bench import load_prompts
from scripts.bench_batch import stream_clients


def main() -> None:
    c, per, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    medusa = mode == "medusa"
    chats = [[{"role": "user", "content": p.text}] for p in load_prompts("../shared/data/mt_bench_question.jsonl")]
    gen = runtime.load("artifacts/smollm2-135m-medusa", threads=2, max_batch=c, reuse_prefix=False)
    gen.generate(chats[-1], max_new_tokens=8)
    eng = gen.engine
    eng.stats.update({k: 0 if isinstance(v, int) else 0.0 for k, v in eng.stats.items()})
    done, wall = stream_clients(gen, chats, c, c * per, medusa=medusa)
    tokens = [sum(len(got) for _, got in done)]
    st = eng.stats
    print(
        f"{mode} x{c}: {tokens[0] / wall:.1f} tok/s, wall {wall:.1f} s, engine {st['engine_s'] / wall:.0%}, "
        f"calls {st['calls']} ({st['calls'] / wall:.1f}/s), seq/call {st['sequences'] / max(1, st['calls']):.2f}, "
        f"engine ms/call {1000 * st['engine_s'] / max(1, st['calls']):.1f}, wall ms/call {1000 * wall / max(1, st['calls']):.1f}, "
        f"heads calls {st['heads_calls']}, screened {st['screened_calls']}, host ms a sequence { {k: round(1000 * v, 3) for k, v in eng.host.items()} }"
    )
    gen.close()


if __name__ == "__main__":
    main()
