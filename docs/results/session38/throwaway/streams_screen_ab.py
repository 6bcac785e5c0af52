"""C streams of 128 tokens in one process on runtime.load(..., max_batch=C), the batch engine's lm_head screen
limit A against B (``engine.screen_max_rows``), in ABBA rounds; plain or Medusa (session 38).

    python docs/results/session38/throwaway/streams_screen_ab.py 8 2 plain 1 48
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))  # the repository: scripts.bench_batch

import runtime
from runtime.bench import load_prompts
from scripts.bench_batch import stream_clients


def main() -> None:
    c, per, mode, a, b = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    medusa = mode == "medusa"
    chats = [[{"role": "user", "content": p.text}] for p in load_prompts("../shared/data/mt_bench_question.jsonl")]
    gen = runtime.load("artifacts/smollm2-135m-medusa", threads=2, max_batch=c, reuse_prefix=False)
    gen.generate(chats[-1], max_new_tokens=8)
    eng = gen.engine
    print(f"profile's limit: {eng.screen_max_rows}")
    answers: dict[int, dict[int, list[int]]] = {a: {}, b: {}}

    def level(cut: int, first: int) -> tuple[float, int, int]:
        eng.screen_max_rows = cut
        eng.stats.update({k: 0 if isinstance(v, int) else 0.0 for k, v in eng.stats.items()})
        done, wall = stream_clients(gen, chats, c, c * per, first, medusa)
        answers[cut].update(done)
        return sum(len(got) for _, got in done) / wall, eng.stats["screened_calls"], eng.stats["calls"]

    rates: dict[int, list[float]] = {a: [], b: []}
    try:
        for rnd, cut in enumerate((a, b, b, a)):
            rate, screened, calls = level(cut, (rnd // 2) * c * per)
            rates[cut].append(rate)
            print(
                f"{mode} x{c}, screen up to {cut:3d} rows: {rate:6.1f} tok/s ({screened}/{calls} calls screened)",
                flush=True,
            )
    finally:
        gen.close()
    same = sum(answers[a][k] == answers[b][k] for k in answers[a] if k in answers[b])
    ra, rb = (sum(rates[x]) / 2 for x in (a, b))
    print(
        f"up to {b} / up to {a}: {rb / ra:.3f}x (means of two rounds); answers equal {same}/{len(set(answers[a]) & set(answers[b]))}"
    )


if __name__ == "__main__":
    main()
