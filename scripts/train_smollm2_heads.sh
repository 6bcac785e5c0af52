#!/usr/bin/env bash
# Train the shipped SmolLM2-135M heads end to end and select their trees:
# self-distillation -> Medusa-1 -> OUT/heads (float16 + CARD.md) ->
# OUT/tree_configs/smollm2_selected.json (PyTorch reference cost) and smollm2_ort_cpu.json
# (ONNX Runtime cost profile, heads call included) and smollm2_flat64.json (flat cost, GPU-like).
# OUT (default runs/smollm2_heads, git-ignored) is never the source tree: shipping the result is
# a separate, explicit step (printed at the end): copy OUT/heads into exporter/shipped_heads/smollm2-135m
# and OUT/tree_configs/*.json into tree_configs/. An existing OUT/heads is replaced only with FORCE=1.
#   bash scripts/train_smollm2_heads.sh                       # 5,000 prompts, 2 epochs, 2 blocks a head
#   NUM_PROMPTS=3584 EPOCHS=2 LAYERS=1 bash scripts/train_smollm2_heads.sh
#   NUM_PROMPTS=60 MAX_NEW_TOKENS=24 EPOCHS=1 LAYERS=1 DATA=runs/try/d.jsonl OUT=runs/try bash scripts/train_smollm2_heads.sh
#                                                             # a 2-minute dry run of every step
# The heads are installed as float16 (load_heads upcasts) with their draft vocabulary (int64
# token ids): 4 heads x 2 blocks = 5.4 MB.
# Every step resumes or reuses what a previous run left (distillation: OUT.partial and a
# finished OUT is extended; Medusa-1: the hidden-state cache).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
N=${NUM_PROMPTS:-5000}
E=${EPOCHS:-2}
L=${LAYERS:-2}
T=${THREADS:-2}
M=${MAX_NEW_TOKENS:-256}
DATA=${DATA:-runs/distill/smollm2_alpaca.jsonl}
OUT=${OUT:-runs/smollm2_heads}
RUN=$OUT/medusa1_n${N}_e${E}_l${L}
HEADS=$OUT/heads
TREES=$OUT/tree_configs
PROFILE=docs/results/latency_profile.json  # medusa-run profile on the exported artifact (scripts/bench_readme.sh), read only
FORCE_FLAG=
if [ "${FORCE:-0}" = 1 ]; then
  FORCE_FLAG=--force
elif [ -e "$HEADS/medusa_heads.safetensors" ]; then
  echo "train_smollm2_heads.sh: $HEADS already holds heads: FORCE=1 to replace them, or another OUT" >&2
  exit 1
fi

medusa-train distill --model smollm2-135m --num-prompts "$N" --batch-size 64 --max-new-tokens "$M" \
  --temperature 0 --threads "$T" --out "$DATA"
medusa-train medusa1 --model smollm2-135m --data "$DATA" --out "$RUN" --num-heads 4 --num-layers "$L" \
  --lr 1.5e-3 --epochs "$E" --batch-tokens 256 --threads "$T"
python -m scripts.install_heads "$RUN" "$HEADS" "$DATA" --command "NUM_PROMPTS=$N EPOCHS=$E LAYERS=$L THREADS=$T bash scripts/train_smollm2_heads.sh"
medusa-train select-tree --heads "$HEADS" --data "$DATA" --name smollm2_selected --out-dir "$TREES" --threads "$T" $FORCE_FLAG
medusa-train select-tree --heads "$HEADS" --data "$DATA" --name smollm2_ort_cpu --out-dir "$TREES" \
  --profile "$PROFILE" --threads "$T" $FORCE_FLAG
# the same heads where verifying up to 64 tokens costs one step (a GPU): a 64-node tree
medusa-train select-tree --heads "$HEADS" --data "$DATA" --name smollm2_flat64 --out-dir "$TREES" \
  --profile scripts/flat_cost_profile.json --threads "$T" $FORCE_FLAG
echo "to ship them (replaces tracked files; review with git diff):"
echo "  cp $HEADS/* exporter/shipped_heads/smollm2-135m/ && cp $TREES/*.json tree_configs/"
