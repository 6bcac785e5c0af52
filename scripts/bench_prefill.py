"""Peak memory and time of the prefill for a long prompt, by prefill chunk size.

    python -m scripts.bench_prefill artifacts/smollm2-135m-medusa --tokens 4000 --chunks 0 512 256 --threads 2

Each setting runs in its own process (peak RSS is per process): load the artifact, generate
1 token from a ``--tokens``-token prompt (repeated MT-Bench text, raw, no chat template)
``--repeats`` times, and report the process's peak RSS and the median prefill time. Chunk 0
is the whole prompt in one call (what the runtime did before chunked prefill). The first
token must be the same for every setting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import runtime
a = json.loads(sys.argv[1])
gen = runtime.load(a["artifact"], backend="onnxruntime", device="cpu", threads=a["threads"], prefill_chunk=a["chunk"],
                   reuse_prefix=False)  # the prefill is what is timed
text = " ".join(json.loads(l)["turns"][0] for l in open(a["prompts"], encoding="utf-8"))
ids = gen.encode(text)
while len(ids) < a["tokens"]:
    ids = ids + ids
ids = ids[:a["tokens"]]
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times, first = [], None
for _ in range(a["repeats"]):
    out = gen.generate(ids, max_new_tokens=1, medusa=True)
    times.append(out.stats.times["prefill"])
    first = out.tokens[0]
print(json.dumps({"chunk": a["chunk"], "tokens": len(ids), "prefill_s": times, "first_token": first,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_after_load_mb": rss0 / 1024}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact")
    p.add_argument("--prompts", default=str(ROOT.parent / "shared/data/mt_bench_question.jsonl"))
    p.add_argument("--tokens", type=int, default=4000)
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 512, 256])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    rows = []
    for chunk in a.chunks:
        args = {
            "artifact": str(Path(a.artifact).resolve()),
            "prompts": str(Path(a.prompts).resolve()),
            "tokens": a.tokens,
            "chunk": chunk,
            "repeats": a.repeats,
            "threads": a.threads,
        }
        # run in the repository root: `python -c` imports the runtime from the working directory
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            return out.returncode
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"chunk {chunk}: done", file=sys.stderr, flush=True)
    print(f"prefill of a {rows[0]['tokens']}-token prompt, {a.threads} threads, median of {a.repeats}")
    print("chunk (0 = whole)  prefill s  peak RSS MB  after load MB  first token")
    for r in rows:
        print(
            f"{r['chunk']:>17}  {statistics.median(r['prefill_s']):>9.2f}  {r['peak_rss_mb']:>11.0f}  "
            f"{r['rss_after_load_mb']:>13.0f}  {r['first_token']}"
        )
    if len({r["first_token"] for r in rows}) != 1:
        print("warning: the first token differs between settings", file=sys.stderr)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
