#!/usr/bin/env bash
# The growing lookup draft (lookup.DraftWidth, lookup_max) measured: every bench runs lookup_max 12
# (the default) against 3 (a fixed 3-token draft, as before), interleaved prompt by prompt with plain
# decoding and onnxruntime-genai (plain and n-gram).
#   bash scripts/bench_lookup_max.sh [--force] [OUT]     (default OUT: runs/bench_lookup_max; ~35 min)
# All 80 MT-Bench first turns with the default artifact; 2 per category with the Hydra artifact; the
# 24 held-out Alpaca prompts (never trained or tuned on) with both. Nothing is calibrated or tuned here.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench_setup.sh
bench_setup bench_lookup_max medusa_full80.txt "$@"
python -m scripts.heldout_prompts -o "$OUT/alpaca_heldout.json" --last 24
medusa-run bench "$MEDUSA" --prompts "$MT" --threads 2 --peer ortgenai --lookup-max 12 3 \
  --json "$OUT/medusa_full80.json" 2>/dev/null | tee "$OUT/medusa_full80.txt"
medusa-run bench "$HYDRA" --prompts "$MT" --per-category 2 --threads 2 --peer ortgenai --lookup-max 12 3 \
  --json "$OUT/hydra_categories.json" 2>/dev/null | tee "$OUT/hydra_categories.txt"
for A in "$MEDUSA" "$HYDRA"; do
  medusa-run bench "$A" --prompts "$OUT/alpaca_heldout.json" --threads 2 --max-new-tokens 192 --peer ortgenai \
    --lookup-max 12 3 --json "$OUT/$(basename "$A")_alpaca.json" 2>/dev/null | tee "$OUT/$(basename "$A")_alpaca.txt"
done
