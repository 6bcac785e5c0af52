#!/usr/bin/env bash
# Session 36: go on training the shipped heads on answers the lent GPU distilled (runs/gpu_heads/all.jsonl:
# 5,000 greedy + 16,000 sampled at T = 0.7), on this CPU: the first PROMPTS prompts' greedy answer and
# first sampled answer (ID@1), hidden states by the exported engine, then Medusa-1 from the shipped heads.
#   bash docs/results/session36/throwaway/finetune_heads.sh      # from the repository root
set -euo pipefail
cd "$(dirname "$0")/../../../.."
. .venv/bin/activate
P=${PROMPTS:-3000}
STEPS=${STEPS:-2500}
W=runs/ft
mkdir -p $W
python - "$P" <<'PY'
import json, sys
n = int(sys.argv[1])
keep = {f"alpaca-{i:05d}" for i in range(n)} | {f"alpaca-{i:05d}@1" for i in range(n)}
with open("runs/gpu_heads/all.jsonl") as f, open("runs/ft/mix.jsonl", "w") as out:
    kept = [line for line in f if json.loads(line)["id"] in keep]
    out.writelines(kept)
print(f"{len(kept)} records")
PY
python - <<'PY'
from pathlib import Path
from training.distill import keep_states_on_engine, read_records
n = keep_states_on_engine(Path("artifacts/smollm2-135m-medusa"), read_records(Path("runs/ft/mix.jsonl")),
                          Path("runs/ft/mix.jsonl"), "smollm2-135m", threads=2)
print(f"hidden states of {n} records")
PY
medusa-train medusa1 --model smollm2-135m --data $W/mix.jsonl --out $W/heads_run --num-heads 4 --num-layers 2 \
  --init-heads exporter/shipped_heads/smollm2-135m --lr 5e-4 --epochs 1 --max-steps "$STEPS" --batch-tokens 256 --threads 2
