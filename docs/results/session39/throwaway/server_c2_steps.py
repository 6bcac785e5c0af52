"""The plain and the Medusa server at C clients, ABBA rounds of R requests (128 tokens), each server's /metrics read
after every round: tokens a step and the engine's sequences a call over the round (session 39).

    python docs/results/session39/throwaway/server_c2_steps.py 2 16
"""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))  # the repository: scripts.load_test

import httpx

from runtime.bench import load_prompts
from scripts.load_test import _stop, run_level, start_server


def counters(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    out = {}
    for name in ("medusa_generated_tokens_total", "medusa_decode_steps_total", "medusa_step_seconds_count",
                 "medusa_step_seconds_sum", "medusa_engine_sequences_per_call"):  # fmt: skip
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else float("nan")
    return out


def main() -> None:
    c, n = int(sys.argv[1]), int(sys.argv[2])
    prompts = [p.text for p in load_prompts("../shared/data/mt_bench_question.jsonl")]
    servers = {k: start_server("artifacts/smollm2-135m-medusa", k, 16, 2) for k in ("plain", "medusa")}
    try:
        for _, url in servers.values():
            run_level(url, "smollm2-135m-medusa", prompts[-1:], 1, 1, 8, 600)
        for kind in ("plain", "medusa", "medusa", "plain"):
            url = servers[kind][1]
            before = counters(url)
            row = run_level(url, "smollm2-135m-medusa", prompts, c, n, 128, 600)
            after = counters(url)
            d = {k: after[k] - before[k] for k in after}
            print(f"{kind:>6} c={c}: {row['tokens_per_s']:6.1f} tok/s, tokens/step "
                  f"{d['medusa_generated_tokens_total'] / max(1, d['medusa_decode_steps_total']):.3f}, "
                  f"mean step {1000 * d['medusa_step_seconds_sum'] / max(1, d['medusa_step_seconds_count']):.1f} ms, "
                  f"ttft p50 {1000 * row['ttft_p50']:.0f} ms, seq/call {after['medusa_engine_sequences_per_call']:.2f}",
                  flush=True)  # fmt: skip
    finally:
        _stop([p for p, _ in servers.values()])


if __name__ == "__main__":
    main()
