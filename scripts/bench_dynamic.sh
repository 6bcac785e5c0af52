#!/usr/bin/env bash
# Dynamic trees (runtime/dynamic.py) against the static trees, same engine, one run:
#   0. calibrate both artifacts on 24 held-out Alpaca prompts (disjoint from step 3's, never MT-Bench)
#   1. Hydra, 2 MT-Bench prompts of each of the 8 categories, greedy, 256 tokens: its CPU tree, the
#      8-node tree, dynamic on this CPU's cost profile, and dynamic with at most 11 drafted nodes on a
#      flat cost (verification as on a GPU: <= 12 tokens a step, issue 13's acceptance budget), with
#      onnxruntime-genai plain and n-gram speculation interleaved
#   2. the same with the Medusa-1 heads
#   3. 24 held-out Alpaca prompts, Hydra and Medusa-1: static vs dynamic, with onnxruntime-genai
#   4. exact sampling at 0.7, first 16 MT-Bench prompts, Hydra: chain_1 (its sampling tree) vs dynamic
# Writes into OUT (default runs/bench_dynamic, git-ignored); --force replaces existing results.
#   bash scripts/bench_dynamic.sh [--force] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench_setup.sh
bench_setup bench_dynamic hydra_categories.txt "$@"
calibrate_heldout
medusa-run bench "$HYDRA" --prompts "$MT" --per-category 2 --threads 2 --peer ortgenai \
  --tree smollm2_hydra_ort_cpu smollm2_hydra_flat8 dynamic "dynamic:11@$FLAT" \
  --json "$OUT/hydra_categories.json" 2>/dev/null | tee "$OUT/hydra_categories.txt"
medusa-run bench "$MEDUSA" --prompts "$MT" --per-category 2 --threads 2 --peer ortgenai \
  --tree smollm2_ort_cpu dynamic "dynamic:11@$FLAT" \
  --json "$OUT/medusa_categories.json" 2>/dev/null | tee "$OUT/medusa_categories.txt"
for A in "$HYDRA" "$MEDUSA"; do
  N=$(basename "$A")
  T=$([ "$A" = "$HYDRA" ] && echo smollm2_hydra_ort_cpu || echo smollm2_ort_cpu)
  medusa-run bench "$A" --prompts "$OUT/alpaca_heldout.json" --threads 2 --max-new-tokens 192 --peer ortgenai \
    --tree "$T" dynamic --json "$OUT/${N}_alpaca.json" 2>/dev/null | tee "$OUT/${N}_alpaca.txt"
done
for T in chain_1 dynamic; do
  medusa-run bench "$HYDRA" --prompts "$MT" --limit 16 --threads 2 --sampling 0.7 --quiet --tree "$T" \
    --json "$OUT/hydra_sampling_$T.json" 2>/dev/null | tee "$OUT/hydra_sampling_$T.txt"
done
