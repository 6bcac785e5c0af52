"""What the Medusa server's steps are under load: the plain and the Medusa server (scripts/load_test.py's
start_server, both up at once as in the load test), levels in the load test's order, ABBA rounds, and each
level's tokens per decode step from the server's own /metrics (1.008: plain steps, the prefill's token aside).

    python docs/results/session37/server_steps.py 1 2 4 8 16
"""

import json
import re
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from runtime.bench import load_prompts
from scripts.load_test import _stop, run_level, start_server

COUNTERS = ("medusa_generated_tokens_total", "medusa_decode_steps_total")


def counters(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    return {n: float(re.search(r"^" + n + r" ([0-9.e+-]+)$", text, re.M).group(1)) for n in COUNTERS}  # type: ignore[union-attr]


def main() -> None:
    levels = [int(x) for x in sys.argv[1:]]
    prompts = [p.text for p in load_prompts("../shared/data/mt_bench_question.jsonl")]
    servers = {k: start_server("artifacts/smollm2-135m-medusa", k, 16, 2) for k in ("plain", "medusa")}
    model = json.loads(urllib.request.urlopen(servers["medusa"][1] + "/v1/models").read())["data"][0]["id"]
    try:
        for _, url in servers.values():
            run_level(url, model, prompts[-1:], 1, 1, 8, 600)
        for c in levels:
            for rnd in range(2):
                for kind in ("plain", "medusa") if rnd == 0 else ("medusa", "plain"):
                    url = servers[kind][1]
                    before = counters(url)
                    r = run_level(url, model, prompts, c, max(16, 4 * c) // 2, 128, 600)
                    after = counters(url)
                    tokens, steps = (after[n] - before[n] for n in COUNTERS)
                    print(f"c={c:<3} {kind:<7} {r['tokens_per_s']:6.1f} tok/s  itl p50 {1000 * r['itl_p50']:3.0f} ms  "
                          f"tokens/step {tokens / max(1, steps):.3f}", flush=True)  # fmt: skip
    finally:
        _stop([p for p, _ in servers.values()])


if __name__ == "__main__":
    main()
