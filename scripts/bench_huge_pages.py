"""Decoding speed with and without huge pages for the weights (runtime.hugepages), side by side.

    python -m scripts.bench_huge_pages artifacts/smollm2-135m-medusa --prompts ../shared/data/mt_bench_question.jsonl \
        --limit 4 --max-new-tokens 128 --rounds 3 --threads 2

Huge pages are a property of a process's memory, so each setting runs in its own process
(``MEDUSA_TRT_HUGE_PAGES=1`` / ``=0``), alternated ``--rounds`` times: load the artifact (timed),
then decode the first ``--limit`` prompts plain and with Medusa. Prints each process's tok/s and
load time, then the medians and the ratios on / off; the tokens must be the same in every process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from scripts.common import add_ab_arguments

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
a = json.loads(sys.argv[1])
t = time.perf_counter()
import runtime
from runtime import hugepages
gen = runtime.load(a["artifact"], backend="onnxruntime", device="cpu", threads=a["threads"], reuse_prefix=False)
load_s = time.perf_counter() - t
prompts = [json.loads(l)["turns"][0] for l in open(a["prompts"], encoding="utf-8")][: a["limit"]]
ids = [gen.encode([{"role": "user", "content": p}]) for p in prompts]
gen.generate(ids[0], max_new_tokens=8, medusa=False)
gen.generate(ids[0], max_new_tokens=8)
out = {"load_s": load_s, "huge_mb": sum(r.collapsed_mb for r in hugepages.RECORDS.values()), "tokens": []}
for medusa in (False, True):
    n = secs = 0.0
    for x in ids:
        t = time.perf_counter()
        o = gen.generate(x, max_new_tokens=a["max_new_tokens"], medusa=medusa)
        secs += time.perf_counter() - t
        n += len(o.tokens)
        out["tokens"].append(o.tokens)
    out["medusa" if medusa else "plain"] = n / secs
print(json.dumps(out))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_ab_arguments(p, limit=4, max_new_tokens=128, rounds=3)
    args = p.parse_args(argv)
    a = json.dumps({k: getattr(args, k) for k in ("artifact", "prompts", "limit", "max_new_tokens", "threads")})
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    tokens = None
    print(
        f"{'round':>5} {'huge pages':>10} {'MB':>5} {'load s':>7} {'plain tok/s':>12} {'Medusa tok/s':>13}", flush=True
    )
    for r in range(args.rounds):
        for setting in ("on", "off") if r % 2 == 0 else ("off", "on"):
            env = {**os.environ, "MEDUSA_TRT_HUGE_PAGES": "1" if setting == "on" else "0"}
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, a], cwd=ROOT, env=env, capture_output=True, text=True, check=False
            )
            if proc.returncode:
                sys.stderr.write(proc.stderr)
                return proc.returncode
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            if tokens is None:
                tokens = res["tokens"]
            elif res["tokens"] != tokens:
                print("error: the tokens differ between processes", file=sys.stderr)
                return 1
            runs[setting].append(res)
            print(
                f"{r + 1:>5} {setting:>10} {res['huge_mb']:>5} {res['load_s']:>7.2f} {res['plain']:>12.2f} "
                f"{res['medusa']:>13.2f}",
                flush=True,
            )
    med = {s: {k: statistics.median(x[k] for x in v) for k in ("load_s", "plain", "medusa")} for s, v in runs.items()}
    print(
        f"\nmedians of {args.rounds} processes each, {args.limit} prompts x {args.max_new_tokens} tokens, same tokens:"
    )
    for k, label in (("plain", "plain decoding"), ("medusa", "Medusa")):
        print(
            f"  {label:15s} on {med['on'][k]:6.2f} tok/s, off {med['off'][k]:6.2f} tok/s: "
            f"{med['on'][k] / med['off'][k]:.3f}x"
        )
    print(f"  load            on {med['on']['load_s']:.2f} s, off {med['off']['load_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
