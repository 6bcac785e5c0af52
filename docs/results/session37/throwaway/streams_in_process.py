"""The load test's streams in one process, without HTTP: runtime.load(ARTIFACT, max_batch=16), C client threads
each streaming PER requests of 128 tokens in turn (MT-Bench first turns in order), plain and Medusa in ABBA rounds.

    python docs/results/session37/throwaway/streams_in_process.py 16 2
"""

import sys
import threading
import time

import runtime
from runtime.bench import load_prompts


def main() -> None:
    c, per = int(sys.argv[1]), int(sys.argv[2])
    chats = [[{"role": "user", "content": p.text}] for p in load_prompts("../shared/data/mt_bench_question.jsonl")]
    gen = runtime.load("artifacts/smollm2-135m-medusa", threads=2, max_batch=16, reuse_prefix=False)
    gen.generate(chats[-1], max_new_tokens=8)

    def level(medusa: bool, first: int) -> float:
        tokens, nxt, lock = [0], [first], threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    i = nxt[0]
                    if i >= first + c * per:
                        return
                    nxt[0] += 1
                n = sum(len(ev.tokens) for ev in gen.stream(chats[i % len(chats)], max_new_tokens=128, medusa=medusa))
                with lock:
                    tokens[0] += n

        t = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(c)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return tokens[0] / (time.perf_counter() - t)

    try:
        for rnd in range(2):
            for medusa in (False, True) if rnd == 0 else (True, False):
                print("medusa" if medusa else "plain ", f"{level(medusa, rnd * c * per):.1f} tok/s", flush=True)
    finally:
        gen.close()


if __name__ == "__main__":
    main()
