#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. Exits non-zero when no test ran.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q -n 2 --dist loadfile "$@"
