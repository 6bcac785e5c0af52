"""Eight greedy 128-token streams at once for SECONDS, the same MT-Bench prompts either way: through
``medusa-run serve`` with eight ``openai`` clients (``--url``: a running server), or in process
(``runtime.load(..., max_batch=8)``, eight threads on ``gen.stream``). Prints tokens (chunks) a
second, and for the client its own CPU time. Session 26's check of where the server's throughput
at 8 clients goes (docs/serving.md).

    python docs/results/session26/throwaway/server_vs_inprocess.py 40 --plain
    python docs/results/session26/throwaway/server_vs_inprocess.py 40 --url http://127.0.0.1:8766
"""

import argparse
import json
import resource
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT))

ap = argparse.ArgumentParser()
ap.add_argument("seconds", type=float)
ap.add_argument("--plain", action="store_true")
ap.add_argument("--url", default=None)
a = ap.parse_args()
prompts = [json.loads(line)["turns"][0] for line in open(ROOT.parent / "shared/data/mt_bench_question.jsonl")][:32]
stop = 0.0  # set when the clients start
counted = [0]
lock = threading.Lock()

if a.url:
    import openai

    client = openai.OpenAI(base_url=a.url + "/v1", api_key="unused", max_retries=0, timeout=600)

    def one(prompt: str) -> int:
        chunks = client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=128, temperature=0, stream=True)  # fmt: skip
        return sum(1 for _ in chunks)
else:
    import runtime

    gen = runtime.load(str(ROOT / "artifacts/smollm2-135m-medusa"), threads=2, max_batch=8)
    gen.generate([{"role": "user", "content": "hi"}], max_new_tokens=4)

    def one(prompt: str) -> int:
        pieces = gen.stream([{"role": "user", "content": prompt}], max_new_tokens=128, medusa=not a.plain)
        return sum(len(piece.tokens) for piece in pieces)


def client_loop(i: int) -> None:
    k = i
    while time.time() < stop:
        n = one(prompts[k % len(prompts)])
        with lock:
            counted[0] += n
        k += 8


threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(8)]
start = time.time()
stop = start + a.seconds
for t in threads:
    t.start()
for t in threads:
    t.join()
wall = time.time() - start
use = resource.getrusage(resource.RUSAGE_SELF)
where = f"server {a.url}" if a.url else ("in process, plain" if a.plain else "in process, Medusa")
print(
    f"{where}: {counted[0] / wall:.1f} tokens (chunks) a second; this process's CPU {use.ru_utime + use.ru_stime:.1f} s "
    f"over {wall:.1f} s"
)
