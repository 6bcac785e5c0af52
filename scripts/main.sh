#!/usr/bin/env bash
# The main job on a fresh machine: set up, export the embedded SmolLM2-135M-Instruct with the
# shipped Medusa heads to artifacts/smollm2-135m-medusa, generate with Medusa on ONNX Runtime,
# and benchmark Medusa against plain decoding and onnxruntime-genai on a few MT-Bench prompts.
#   bash scripts/main.sh                 # everything
#   BENCH_LIMIT=80 bash scripts/main.sh  # the full MT-Bench first turns (~30 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ART=artifacts/smollm2-135m-medusa
OUT=runs/main
mkdir -p "$OUT"
for f in bench.json bench.png; do  # earlier versions of this script wrote them into the artifact
  if [ -f "$ART/$f" ]; then mv "$ART/$f" "$OUT/$f"; fi
done
# exported once, and again only when medusa-trt, the model, the shipped heads or datastore changed since
# (--if-changed compares the recipe the artifact records); default tree for the shipped heads: smollm2_ort_cpu
if ! medusa-export smollm2-135m -o "$ART" --if-changed --check; then
  # what medusa-run wrote into the old artifact (a latency profile, a draft calibration) describes its graphs:
  # kept aside, since an export never replaces a folder holding files it did not write
  for f in latency_profile.json draft_calibration.json; do
    if [ -f "$ART/$f" ]; then mkdir -p "$OUT/previous-artifact" && mv "$ART/$f" "$OUT/previous-artifact/$f"; fi
  done
  medusa-export smollm2-135m -o "$ART" --if-changed
fi
# this machine's cost of verifying N tokens (~40 s), once per artifact: Medusa sizes its lookup drafts by it, and
# calls screen their lm_head up to the row count where that saves the most (runtime.profile.screen_limit). The
# built-in model is the 2026-12-01 machine's; on a CPU where extra rows cost more it over-drafts (on session 30's
# machine 6 tokens cost 1.82x one, not 1.27x: Medusa 1.43x plain decoding with the measured profile, 1.36x without,
# docs/results/session30/throwaway/cost_model_ab.txt)
if [ ! -f "$ART/latency_profile.json" ]; then
  medusa-run profile "$ART" --threads 2
fi
medusa-run generate "$ART" "Explain in three sentences why the sky is blue." --threads 2 --stats
# beside the best plain decoder a user could run instead: onnxruntime-genai on the same weights (its model
# builder's graph, built once into ~/.cache/medusa-trt), prompt by prompt in the same run
medusa-run bench "$ART" --prompts ../shared/data/mt_bench_question.jsonl --limit "${BENCH_LIMIT:-5}" \
  --threads 2 --peer ortgenai --json "$OUT/bench.json" --plot "$OUT/bench.png"
