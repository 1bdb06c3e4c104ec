#!/usr/bin/env bash
# For the lead (gowalla jobs run serially): RULE vs PEEL on gowalla at 10.7 / 21.3 / 53.3%,
# test split, on the stage 1 and item groups of /work/runs/gw_var/svdgT (seed 2024).
#   benchmarks/rule_gowalla.sh [RUN] [OUT]            # the authors' search (50 cycles)
#   CYCLES1000=1 benchmarks/rule_gowalla.sh [RUN] [OUT]   # also the 1,000-cycle search
# Expected on one free core: ~45 min for the first (RULE labels 2,000 configurations per
# budget over 1,000 validation users, ~0.3 s CPU each, so ~10 min per budget, plus PEEL's and
# RULE's test evaluation), ~35 min more for the second (same labels recomputed). Scaled from
# ml-1m (~25 ms CPU per configuration, 11.3x fewer items), not measured on gowalla. Memory:
# under 2 GB (the labeller holds two 1,000 x 40,981 float32 matrices).
# Then copy OUT/{seed2024.json,seeds.json,paired.json,summary.md} (and OUT1000's) to
# docs/results/gowalla/rule/ (and .../rule/cycles1000/).
set -euo pipefail
RUN=${1:-/work/runs/gw_var/svdgT}
OUT=${2:-/work/runs/rule_gw_cmp}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
/usr/bin/time -v "$PY" benchmarks/budget_compare.py "$RUN" --out "$OUT" --baselines rule \
  2> "$OUT.time" | tee "$OUT.log"
"$PY" benchmarks/budget_compare.py --summarise "$OUT"
if [ "${CYCLES1000:-0}" = 1 ]; then
  mkdir -p "${OUT}1000"
  /usr/bin/time -v "$PY" benchmarks/budget_compare.py "$RUN" --out "${OUT}1000" \
    --baselines rule --rule cycles=1000 2> "${OUT}1000.time" | tee "${OUT}1000.log"
  "$PY" benchmarks/budget_compare.py --summarise "${OUT}1000"
fi
