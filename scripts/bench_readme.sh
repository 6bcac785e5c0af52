#!/usr/bin/env bash
# Every number in README's results section, one run after the other on the same machine
# (2 threads, greedy unless stated, 256 new tokens, MT-Bench first turns through the chat template):
#   1. the cost profile of the fused fp32 graph, ours and onnxruntime-genai's side by side
#   2. fp32: plain vs Medusa (lookup on / off) vs onnxruntime-genai plain and n-gram, first 16 prompts
#   3. fp32: lookup on / off per category, 2 prompts of each of the 8 categories
#   4. int4: plain vs Medusa chains vs onnxruntime-genai int4, first 16 prompts
#   5. fp32 sampling: plain vs exact vs typical at temperature 0.7 and 1.0, first 16 prompts
# Writes into OUT (default docs/results): *.txt as printed, *.json in full.
#   bash scripts/bench_readme.sh [OUT] [LIMIT]
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
OUT=${1:-docs/results}
LIMIT=${2:-16}
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
