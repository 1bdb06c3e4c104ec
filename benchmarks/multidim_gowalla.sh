#!/usr/bin/env bash
# For the lead (gowalla jobs run serially): ESAPN and AutoEmb at 10.7 / 21.3 / 53.3% on gowalla,
# test split, on the run /work/runs/gw_var/svdgT (seed 2024), with PEEL's rows of the same run
# (docs/results/gowalla/issue14/seed2024.json) alongside in table.md.
#   benchmarks/multidim_gowalla.sh [RUN] [OUT]
# Same settings as the committed ml-1m rows (docs/results/ml-1m/multidim): epochs capped at 10,
# patience 5, the run's [pretrain] optimiser, uniform negatives, no tuning trials.
# Expected: 2-3 h (not measured on gowalla). Scaled from ml-1m (6,039 users x 3,628 items,
# 591k training interactions), where one training step took 0.13 s (ESAPN) / 0.29 s (AutoEmb)
# on a free core and a whole fit of 10 epochs 264-324 s / 514-632 s on the shared box
# (docs/results/ml-1m/multidim/seed0.json). Gowalla (29,858 x 40,981, 719k interactions): 88
# steps per epoch with ~2.5x the users and items per batch and a dense Adam step over 7x the
# rows, ~1 min per ESAPN epoch and ~2.5 min per AutoEmb epoch including the validation
# ranking (30k x 41k scores; AutoEmb ranks twice, deployed and soft): ~35 min for ESAPN's
# three budgets and ~80 min for AutoEmb's, plus test evaluation and latency, on a free core.
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
