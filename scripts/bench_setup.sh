# Sourced by the bench_*.sh scripts: `bench_setup SCRIPT MARKER "$@"` parses [--force] [OUT] into OUT
# (default runs/SCRIPT), refuses to overwrite OUT/MARKER without --force, activates .venv, sets MT,
# MEDUSA and HYDRA, and exports either artifact that is missing.
bench_setup() {
  local script=$1 marker=$2 force=0
  shift 2
  if [ "${1:-}" = "--force" ]; then force=1; shift; fi
  OUT=${1:-runs/$script}
  if [ "$force" = 0 ] && [ -e "$OUT/$marker" ]; then
    echo "$script.sh: $OUT/$marker exists: pass --force to replace the results in $OUT" >&2
    exit 1
  fi
  . .venv/bin/activate
  MT=../shared/data/mt_bench_question.jsonl
  MEDUSA=artifacts/smollm2-135m-medusa
  HYDRA=artifacts/smollm2-135m-hydra
  mkdir -p "$OUT"
  [ -f "$MEDUSA/medusa_config.json" ] || medusa-export smollm2-135m -o "$MEDUSA"
  [ -f "$HYDRA/medusa_config.json" ] || medusa-export smollm2-135m --heads exporter/shipped_heads/smollm2-135m-hydra -o "$HYDRA"
}

# The evaluation's 24 held-out Alpaca prompts ($OUT/alpaca_heldout.json) and a disjoint 24 to
# calibrate the dynamic trees of both artifacts on (medusa-run calibrate; never MT-Bench).
calibrate_heldout() {
  python -m scripts.heldout_prompts -o "$OUT/alpaca_heldout.json" --last 24
  python -m scripts.heldout_prompts -o "$OUT/alpaca_calibration.json" --last 24 --drop-last 52
  for A in "$HYDRA" "$MEDUSA"; do
    medusa-run calibrate "$A" --prompts "$OUT/alpaca_calibration.json" --limit 24 --threads 2 2>/dev/null \
      | tee "$OUT/$(basename "$A")_calibration.txt"
  done
}
