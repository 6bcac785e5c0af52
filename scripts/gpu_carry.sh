#!/usr/bin/env bash
# Prepare what a lent GPU machine without network needs for scripts/gpu_train_heads.sh, where one call
# carries at most 64 MiB with the repository: the model file in pieces (.gpu/p1 .. .gpu/pN, each sized so
# that it and the tracked files fit one call), the wheels the machine lacks (.whl: transformers as pinned,
# gguf, regex; CPython 3.12, manylinux x86-64) and the Alpaca prompts (.gpu/in). Both folders are git-ignored
# (.git/info/exclude). Then it prints the calls to make, in order (session 36 made them; docs/results/HISTORY.md).
#   bash scripts/gpu_carry.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
LIMIT=$((64 * 1024 * 1024))
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
for d in /.whl/ /.gpu/; do grep -qxF "$d" "$EXCLUDE" 2>/dev/null || echo "$d" >> "$EXCLUDE"; done
GGUF=$(python -c "from exporter.models import _gguf_path; print(_gguf_path())")
rm -rf .gpu .whl && mkdir -p .gpu/in .whl
cp ../shared/data/alpaca_5000.json .gpu/in/
pins() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "transformers==$(pins transformers)" "gguf==$(pins gguf)" "regex==$(pins regex)"
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
first=$((LIMIT - tracked - $(du -sb .whl .gpu/in | awk '{s += $1} END {print s}') - 2 * 1024 * 1024))
rest=$((LIMIT - tracked - 2 * 1024 * 1024))
if [ "$first" -le 0 ] || [ "$rest" -le 0 ]; then echo "gpu_carry.sh: the tracked files ($tracked bytes) leave no room" >&2; exit 1; fi
size=$(stat -c %s "$GGUF")
offset=0 n=1
while [ "$offset" -lt "$size" ]; do
  chunk=$([ "$n" = 1 ] && echo "$first" || echo "$rest")
  mkdir -p ".gpu/p$n"
  dd if="$GGUF" of=".gpu/p$n/gguf.$n" bs=1M iflag=skip_bytes,count_bytes skip="$offset" count="$chunk" status=none
  offset=$((offset + chunk)) n=$((n + 1))
done
parts=$((n - 1))
[ "$(cat .gpu/p*/gguf.* | sha256sum | cut -d' ' -f1)" = "$(sha256sum "$GGUF" | cut -d' ' -f1)" ]
echo "the model in $parts pieces; the calls, each right after the one before (a machine idle 30 s is given back):"
echo "  1. carry [.whl, .gpu/p1, .gpu/in]: mkdir -p /tmp/parts /tmp/whl && cp .gpu/p1/* /tmp/parts/ && cp .whl/*.whl /tmp/whl/ && cp .gpu/in/alpaca_5000.json /tmp/"
for ((k = 2; k < parts; k++)); do echo "  $k. carry [.gpu/p$k]: cp .gpu/p$k/* /tmp/parts/"; done
echo "  $parts. carry [.gpu/p$parts]: cp .gpu/p$parts/* /tmp/parts/; GGUF_PARTS=/tmp/parts WHEELS=/tmp/whl PROMPTS=/tmp/alpaca_5000.json WORK=/tmp/work bash scripts/gpu_train_heads.sh, then copy /tmp/work/heads/* and the answers (xz, split under 16 MiB) to \$OUT"
