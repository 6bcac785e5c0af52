#!/usr/bin/env bash
# The numbers in README: Medusa vs plain decoding on the same ONNX Runtime engine (MT-Bench first
# turns, greedy, 256 new tokens, 2 threads), then Hugging Face generate as a peer on fewer prompts.
#   bash scripts/bench_readme.sh [LIMIT] [PEER_LIMIT]
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
ART=artifacts/smollm2-135m-medusa
OUT=docs/results
mkdir -p "$OUT"
LIMIT=${1:-8}
PEER_LIMIT=${2:-3}
[ -f "$ART/medusa_config.json" ] || medusa-export smollm2-135m -o "$ART" --tree smollm2_ort_cpu
medusa-run profile "$ART" --threads 2 --repeats 11 -o "$OUT/latency_profile.json"
medusa-run bench "$ART" --prompts ../shared/data/mt_bench_question.jsonl --limit "$LIMIT" --threads 2 \
  --tree smollm2_ort_cpu smollm2_selected --json "$OUT/bench.json" --plot "$OUT/bench.png" | tee "$OUT/bench.txt"
medusa-run bench "$ART" --prompts ../shared/data/mt_bench_question.jsonl --limit "$PEER_LIMIT" --threads 2 \
  --tree smollm2_ort_cpu --peer hf --json "$OUT/bench_peer.json" | tee "$OUT/bench_peer.txt"
