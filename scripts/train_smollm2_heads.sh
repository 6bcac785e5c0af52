#!/usr/bin/env bash
# Train the shipped SmolLM2-135M heads end to end, install them and select the trees:
# self-distillation -> Medusa-1 -> exporter/shipped_heads/smollm2-135m (+ CARD.md) ->
# tree_configs/smollm2_selected.json (PyTorch reference cost) and smollm2_ort_cpu.json
# (ONNX Runtime cost profile, heads call included) and smollm2_flat64.json (flat cost, GPU-like).
#   bash scripts/train_smollm2_heads.sh                       # 4,096 prompts, 2 epochs
#   NUM_PROMPTS=5000 EPOCHS=3 bash scripts/train_smollm2_heads.sh
# Every step resumes or reuses what a previous run left (distillation: OUT.partial and a
# finished OUT is extended; Medusa-1: the hidden-state cache).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
N=${NUM_PROMPTS:-4096}
E=${EPOCHS:-2}
T=${THREADS:-2}
DATA=runs/distill/smollm2_alpaca.jsonl
RUN=runs/medusa1/smollm2_n${N}_e${E}
HEADS=exporter/shipped_heads/smollm2-135m
PROFILE=docs/results/latency_profile.json  # medusa-run profile on the exported artifact (scripts/bench_readme.sh)

medusa-train distill --model smollm2-135m --num-prompts "$N" --batch-size 64 --max-new-tokens 256 \
  --temperature 0 --threads "$T" --out "$DATA"
medusa-train medusa1 --model smollm2-135m --data "$DATA" --out "$RUN" --num-heads 4 --num-layers 1 \
  --lr 1.5e-3 --epochs "$E" --batch-tokens 256 --threads "$T"
python - "$RUN" "$HEADS" "$DATA" "$N" "$E" "$T" <<'PY'
import shutil, sys
from pathlib import Path
from training.card import write_card
run, heads, data, n, e, t = sys.argv[1:]
for f in ("medusa_heads.safetensors", "medusa_heads.json"):
    shutil.copy(Path(run) / f, Path(heads) / f)
write_card(Path(heads), Path(data), command=f"NUM_PROMPTS={n} EPOCHS={e} THREADS={t} bash scripts/train_smollm2_heads.sh",
           machine="shared 2-core AMD EPYC VM (AVX2), 24 GB RAM, no GPU, torch 2.13 CPU")
print(f"installed {run} into {heads}")
PY
medusa-train select-tree --heads "$HEADS" --data "$DATA" --name smollm2_selected --out-dir tree_configs --threads "$T"
medusa-train select-tree --heads "$HEADS" --data "$DATA" --name smollm2_ort_cpu --out-dir tree_configs \
  --profile "$PROFILE" --threads "$T"
# the same heads where verifying up to 64 tokens costs one step (a GPU): a 64-node tree
medusa-train select-tree --heads "$HEADS" --data "$DATA" --name smollm2_flat64 --out-dir tree_configs \
  --profile scripts/flat_cost_profile.json --threads "$T"
