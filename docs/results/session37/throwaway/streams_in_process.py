"""The load test's streams in one process, without HTTP: runtime.load(ARTIFACT, max_batch=16), C client threads
each streaming PER requests of 128 tokens in turn (MT-Bench first turns in order), plain and Medusa in ABBA rounds.

    python docs/results/session37/throwaway/streams_in_process.py 16 2
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))  # the repository: scripts.bench_batch

import runtime
from runtime.bench import load_prompts
from scripts.bench_batch import stream_clients


def main() -> None:
    c, per = int(sys.argv[1]), int(sys.argv[2])
    chats = [[{"role": "user", "content": p.text}] for p in load_prompts("../shared/data/mt_bench_question.jsonl")]
    gen = runtime.load("artifacts/smollm2-135m-medusa", threads=2, max_batch=16, reuse_prefix=False)
    gen.generate(chats[-1], max_new_tokens=8)

    def level(medusa: bool, first: int) -> float:
        done, wall = stream_clients(gen, chats, c, c * per, first, medusa)
        return sum(len(got) for _, got in done) / wall

    try:
        for rnd in range(2):
            for medusa in (False, True) if rnd == 0 else (True, False):
                print("medusa" if medusa else "plain ", f"{level(medusa, rnd * c * per):.1f} tok/s", flush=True)
    finally:
        gen.close()


if __name__ == "__main__":
    main()
