#!/usr/bin/env bash
# For the lead (gowalla jobs run serially): RULE vs PEEL on gowalla at 10.7 / 21.3 / 53.3%,
# test split, on the stage 1 and item groups of /work/runs/gw_var/svdgT (seed 2024).
#   benchmarks/rule_gowalla.sh [RUN] [OUT]
# Expected: ~45 min on one free core (RULE labels 2,000 configurations per budget over 1,000
# validation users: ~0.3 s CPU each, ~10 min per budget; plus PEEL's and RULE's full test
# evaluation); scaled from ml-1m (26 ms CPU per configuration, 11.3x fewer items), not measured.
# Peak memory ~2 GB. Then copy OUT/seed2024.json, seeds.json, paired.json, summary.md to
# docs/results/gowalla/rule/.
set -euo pipefail
RUN=${1:-/work/runs/gw_var/svdgT}
OUT=${2:-/work/runs/rule_gw_cmp}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
/usr/bin/time -v "$PY" benchmarks/budget_compare.py "$RUN" --out "$OUT" --baselines rule \
  2> "$OUT.time" | tee "$OUT.log"
"$PY" benchmarks/budget_compare.py --summarise "$OUT"
