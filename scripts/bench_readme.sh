#!/usr/bin/env bash
# Every number in the first part of the results record (docs/results/README.md), one run after the other on the same machine
# (2 threads, greedy unless stated, 256 new tokens, MT-Bench first turns through the chat template):
#   1. the cost profile of the fused fp32 graph, ours and onnxruntime-genai's side by side
#   2. fp32: plain vs Medusa (lookup on / off) vs onnxruntime-genai plain and n-gram, first 16 prompts
#   3. fp32: lookup on / off per category, 2 prompts of each of the 8 categories
#   4. int4: plain vs Medusa chains vs onnxruntime-genai int4, first 16 prompts
#   5. fp32 sampling: plain vs exact vs typical at temperature 0.7 and 1.0, first 16 prompts
# Writes into OUT (default runs/bench_readme, git-ignored): *.txt as printed, *.json in full.
# Files already in OUT are replaced only with --force (the record's files are refreshed with
# `bash scripts/bench_readme.sh --force docs/results 16`).
#   bash scripts/bench_readme.sh [--force] [OUT] [LIMIT]
set -euo pipefail
cd "$(dirname "$0")/.."
FORCE=0
if [ "${1:-}" = "--force" ]; then FORCE=1; shift; fi
OUT=${1:-runs/bench_readme}
LIMIT=${2:-16}
FILES="latency_profile.json profile.txt bench.json bench.png bench.txt bench_categories.json bench_categories.txt
bench_int4.json bench_int4.txt bench_sampling.json bench_sampling.txt"
if [ "$FORCE" = 0 ]; then
  for f in $FILES; do
    if [ -e "$OUT/$f" ]; then
      echo "bench_readme.sh: $OUT/$f exists: pass --force to replace the results in $OUT, or give another folder" >&2
      exit 1
    fi
  done
fi
. .venv/bin/activate
MT=../shared/data/mt_bench_question.jsonl
mkdir -p "$OUT"
echo "writing results into $OUT"
ART=artifacts/smollm2-135m-medusa
INT4=artifacts/smollm2-135m-int4
[ -f "$ART/medusa_config.json" ] || medusa-export smollm2-135m -o "$ART"
[ -f "$INT4/medusa_config.json" ] || medusa-export smollm2-135m -o "$INT4" --precision int4
medusa-run profile "$ART" --threads 2 --repeats 11 --peer ortgenai -o "$OUT/latency_profile.json" | tee "$OUT/profile.txt"
medusa-run bench "$ART" --prompts "$MT" --limit "$LIMIT" --threads 2 --peer ortgenai --lookup 3 0 \
  --json "$OUT/bench.json" --plot "$OUT/bench.png" | tee "$OUT/bench.txt"
medusa-run bench "$ART" --prompts "$MT" --per-category 2 --threads 2 --lookup 3 0 \
  --json "$OUT/bench_categories.json" | tee "$OUT/bench_categories.txt"
medusa-run bench "$INT4" --prompts "$MT" --limit "$LIMIT" --threads 2 --peer ortgenai --tree chain_1 chain_2 \
  --json "$OUT/bench_int4.json" | tee "$OUT/bench_int4.txt"
medusa-run bench "$ART" --prompts "$MT" --limit "$LIMIT" --threads 2 --sampling 0.7 1.0 --quiet \
  --json "$OUT/bench_sampling.json" | tee "$OUT/bench_sampling.txt"
