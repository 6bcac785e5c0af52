#!/usr/bin/env bash
# Issue 13's numbers: the shipped Hydra heads against the shipped Medusa-1 heads, same backbone,
# same engine, one run after the other (2 threads, greedy unless stated, MT-Bench first turns):
#   1. Hydra, first 16 MT-Bench prompts, 256 tokens: plain vs heads + lookup vs heads only,
#      with onnxruntime-genai plain and n-gram speculation interleaved (--peer ortgenai)
#   2. accepted tokens per step per category, 2 prompts of each of the 8 categories, Hydra (its CPU
#      tree and the 8-node tree) and Medusa, with onnxruntime-genai interleaved
#   3. outside MT-Bench: 24 held-out Alpaca prompts (the split no head trained on), Hydra and Medusa,
#      with onnxruntime-genai interleaved
#   4. sampling at temperature 0.7, Hydra: plain vs exact (top-k / sampled drafts) vs typical
# Writes into OUT (default runs/bench_hydra, git-ignored); --force replaces existing results.
#   bash scripts/bench_hydra.sh [--force] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench_setup.sh
bench_setup bench_hydra hydra_bench.txt "$@"
python -m scripts.heldout_prompts -o "$OUT/alpaca_heldout.json" --last 24
medusa-run bench "$HYDRA" --prompts "$MT" --limit 16 --threads 2 --peer ortgenai --lookup 3 0 \
  --json "$OUT/hydra_bench.json" | tee "$OUT/hydra_bench.txt"
medusa-run bench "$HYDRA" --prompts "$MT" --per-category 2 --threads 2 --peer ortgenai --lookup 3 0 \
  --tree smollm2_hydra_ort_cpu smollm2_hydra_flat8 \
  --json "$OUT/smollm2-135m-hydra_categories.json" | tee "$OUT/smollm2-135m-hydra_categories.txt"
medusa-run bench "$MEDUSA" --prompts "$MT" --per-category 2 --threads 2 --peer ortgenai --lookup 3 0 \
  --json "$OUT/smollm2-135m-medusa_categories.json" | tee "$OUT/smollm2-135m-medusa_categories.txt"
for A in "$HYDRA" "$MEDUSA"; do
  N=$(basename "$A")
  medusa-run bench "$A" --prompts "$OUT/alpaca_heldout.json" --threads 2 --max-new-tokens 192 --peer ortgenai \
    --lookup 3 0 --json "$OUT/${N}_alpaca.json" | tee "$OUT/${N}_alpaca.txt"
done
medusa-run bench "$HYDRA" --prompts "$MT" --limit 16 --threads 2 --sampling 0.7 --quiet \
  --json "$OUT/hydra_sampling.json" | tee "$OUT/hydra_sampling.txt"
