#!/usr/bin/env bash
# Train Hydra heads (sequentially dependent, issue 13) for SmolLM2-135M end to end and select their
# tree for ONNX Runtime on this CPU:
#   self-distillation on the exported engine (medusa-train distill --engine: the batch engine, ~3x
#   torch's generation; the hidden states by one causal pass per answer) -> Hydra heads
#   (medusa-train medusa1 --head-type hydra) -> OUT/heads (float16 + CARD.md, <= 10 MB) ->
#   OUT/artifact (medusa-export with those heads) -> its cost profile (a heads call is one depth)
#   -> OUT/tree_configs/smollm2_hydra_ort_cpu.json (select-tree, <= 12 nodes).
# OUT (default runs/smollm2_hydra, git-ignored) is never the source tree; shipping is the printed
# cp. An existing OUT/heads is replaced only with FORCE=1. Every step resumes or reuses what a
# previous run left (the distillation's OUT.partial, the hidden-state cache).
#   bash scripts/train_smollm2_hydra.sh                  # 5,000 prompts, 3 heads, 2 epochs
#   NUM_PROMPTS=60 MAX_NEW_TOKENS=24 EPOCHS=1 DATA=runs/try/d.jsonl OUT=runs/try_hydra bash scripts/train_smollm2_hydra.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
N=${NUM_PROMPTS:-5000}
E=${EPOCHS:-2}
K=${HEADS_COUNT:-3}
L=${LAYERS:-2}
T=${THREADS:-2}
M=${MAX_NEW_TOKENS:-256}
DATA=${DATA:-runs/distill/smollm2_alpaca.jsonl}
OUT=${OUT:-runs/smollm2_hydra}
ENGINE=${ENGINE:-artifacts/smollm2-135m-medusa}
RUN=$OUT/hydra_n${N}_e${E}_k${K}_l${L}
HEADS=$OUT/heads
TREES=$OUT/tree_configs
FORCE_FLAG=
if [ "${FORCE:-0}" = 1 ]; then
  FORCE_FLAG=--force
elif [ -e "$HEADS/medusa_heads.safetensors" ]; then
  echo "train_smollm2_hydra.sh: $HEADS already holds heads: FORCE=1 to replace them, or another OUT" >&2
  exit 1
fi
[ -f "$ENGINE/medusa_config.json" ] || medusa-export smollm2-135m -o "$ENGINE"

medusa-train distill --engine "$ENGINE" --model smollm2-135m --num-prompts "$N" --batch-size 32 \
  --max-new-tokens "$M" --temperature 0 --threads "$T" --out "$DATA"
medusa-train medusa1 --head-type hydra --model smollm2-135m --data "$DATA" --out "$RUN" --num-heads "$K" \
  --num-layers "$L" --lr 1.5e-3 --epochs "$E" --batch-tokens 256 --threads "$T"
python -m scripts.install_heads "$RUN" "$HEADS" "$DATA" --command "NUM_PROMPTS=$N EPOCHS=$E HEADS_COUNT=$K LAYERS=$L THREADS=$T bash scripts/train_smollm2_hydra.sh"
medusa-export smollm2-135m --heads "$HEADS" -o "$OUT/artifact" --tree "chain_$K" --force
medusa-run profile "$OUT/artifact" --threads "$T" --repeats 11 -o "$OUT/hydra_profile.json"
medusa-train select-tree --heads "$HEADS" --data "$DATA" --name smollm2_hydra_ort_cpu --out-dir "$TREES" \
  --profile "$OUT/hydra_profile.json" --max-nodes 12 --threads "$T" $FORCE_FLAG
echo "to ship them (replaces tracked files; review with git diff):"
echo "  mkdir -p exporter/shipped_heads/smollm2-135m-hydra && cp $HEADS/* exporter/shipped_heads/smollm2-135m-hydra/ && cp $TREES/*.json tree_configs/"
