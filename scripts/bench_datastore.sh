#!/usr/bin/env bash
# Datastore drafts (runtime/datastore.py) measured: each bench runs every tree with the datastore on
# and off, interleaved prompt by prompt with plain decoding and onnxruntime-genai (plain and n-gram).
#   bash scripts/bench_datastore.sh [--force] [OUT]     (default OUT: runs/bench_datastore; ~30 min)
# The dynamic trees are first calibrated (with the datastore's rows) on 24 held-out Alpaca prompts
# disjoint from the 24 evaluated; MT-Bench is only evaluated.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench_setup.sh
bench_setup bench_datastore hydra_categories.txt "$@"
for A in "$HYDRA" "$MEDUSA"; do  # artifacts exported before the datastore shipped: add it
  [ -f "$A/datastore.npz" ] || cp exporter/shipped_datastore/smollm2-135m/datastore.npz "$A/"
done
calibrate_heldout
FLAT=scripts/flat_cost_profile.json
medusa-run bench "$HYDRA" --prompts "$MT" --per-category 2 --threads 2 --peer ortgenai --datastore on off \
  --tree smollm2_hydra_ort_cpu dynamic "dynamic:11@$FLAT" \
  --json "$OUT/hydra_categories.json" 2>/dev/null | tee "$OUT/hydra_categories.txt"
medusa-run bench "$MEDUSA" --prompts "$MT" --per-category 2 --threads 2 --peer ortgenai --datastore on off \
  --tree smollm2_ort_cpu dynamic \
  --json "$OUT/medusa_categories.json" 2>/dev/null | tee "$OUT/medusa_categories.txt"
for A in "$HYDRA" "$MEDUSA"; do
  N=$(basename "$A")
  T=$([ "$A" = "$HYDRA" ] && echo smollm2_hydra_ort_cpu || echo smollm2_ort_cpu)
  medusa-run bench "$A" --prompts "$OUT/alpaca_heldout.json" --threads 2 --max-new-tokens 192 --peer ortgenai \
    --datastore on off --tree "$T" dynamic --json "$OUT/${N}_alpaca.json" 2>/dev/null | tee "$OUT/${N}_alpaca.txt"
done
for D in on off; do
  medusa-run bench "$HYDRA" --prompts "$MT" --limit 16 --threads 2 --sampling 0.7 --quiet --tree chain_1 \
    --datastore "$D" --json "$OUT/hydra_sampling_$D.json" 2>/dev/null | tee "$OUT/hydra_sampling_$D.txt"
done
