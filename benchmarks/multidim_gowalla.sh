#!/usr/bin/env bash
# For the lead (gowalla jobs run serially): ESAPN and AutoEmb at 10.7 / 21.3 / 53.3% on gowalla,
# test split, on the run /work/runs/gw_var/svdgT (seed 2024), with PEEL's rows of the same run
# (docs/results/gowalla/issue14/seed2024.json) alongside in table.md.
#   benchmarks/multidim_gowalla.sh [RUN] [OUT]
# Same settings as the committed ml-1m rows (docs/results/ml-1m/multidim): epochs capped at 10,
# patience 5, the run's [pretrain] optimiser, uniform negatives, no tuning trials.
# Expected on one free core: 2-3 h (not measured on gowalla; scaled from ml-1m, where one
# epoch took ~10 s for ESAPN and ~20 s for AutoEmb with 6,039 users x 3,628 items and 591k
# training interactions: gowalla has 5x the users, 11x the items and 1.2x the interactions,
# the dense Adam step over every size's table grows with users + items (7x), the hard
# negatives lift every candidate item (11x) and each validation ranks 30k x 41k scores; about
# 1.5 min per ESAPN epoch and 3 min per AutoEmb epoch, 10 epochs each at 3 budgets).
# Memory: under 3 GB (every size's table for 70,839 users and items, 222 floats each, with
# Adam's two moments). Then copy OUT/{seed2024.json,table.md} to docs/results/gowalla/multidim/.
set -euo pipefail
RUN=${1:-/work/runs/gw_var/svdgT}
OUT=${2:-/work/runs/multidim_gw}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
/usr/bin/time -v "$PY" benchmarks/multidim_compare.py "$RUN" --out "$OUT" \
  --reference docs/results/gowalla/issue14/seed2024.json 2> "$OUT.time" | tee "$OUT.log"
