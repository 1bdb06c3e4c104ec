#!/usr/bin/env bash
# For the lead (gowalla and amazon-book-sample jobs run serially): the paper's RQ2 (dynamic
# budgets, Fig. 3), RQ5 (on-device latency, Table IV) and RQ3 (hyper-parameters, Fig. 5) as
# `peel experiment` reports, written straight into docs/results/<dataset>/<experiment>/.
#
#   benchmarks/experiments_gowalla.sh                    # everything below, in this order
#   STEPS="dynamic latency" benchmarks/experiments_gowalla.sh   # a subset
#   DATASETS=gowalla benchmarks/experiments_gowalla.sh           # one dataset
#   DATASETS=ml-1m STEPS="sweep-g sweep-n" benchmarks/experiments_gowalla.sh  # ml-1m's Fig. 5:
#              ~10 min for G_v and G_u (stage 2 ~60-90 s a value), ~45 min for N (stage 1
#              ~5-13 min a value)
#
# Steps and expected wall-clock on one free core of this machine (estimates scaled from the
# recorded fits in docs/results/gowalla/results.json and the RULE timings, not measured here):
#   train-ab   amazon-book-sample run (10,529 users, 66,975 items, 548k train interactions):
#              ~1 h stage 1 + ~10 min stage 2 (skipped when $AB_RUN is complete).
#   dynamic    per dataset: PEEL and lightgcn-svd take a minute; every other method is fitted
#              4 times (0.533 -> 0.213 -> 0.107 -> 0.533): gowalla bpr-mf ~30 min, pmf ~30 min,
#              lightgcn ~60 min, dlrm-ce / lightrec ~30 min each, rule ~40 min; about 4 h for
#              the default list on gowalla, ~3 h on amazon-book-sample.
#   latency    per dataset: PEEL and lightgcn-svd ~5 min (12 timing processes); each other
#              baseline adds 3 fits (e.g. dlrm-ce ~25 min, lightrec ~25 min, rule ~30 min on
#              gowalla). The fixed-size dot-product tables (pmf, bpr-mf, lightgcn) have
#              exactly lightgcn-svd's shape at every budget, so its row is their ranking cost.
#   sweep-g    G_v and G_u in {5,10,15,20,25} at 21.3%, stage 1 reused: the base value (20 / 15)
#              is the run itself; 4 new stage-2 runs each, ~5 min each on gowalla (its stage 2
#              took 253 s), ~40 min for both; similar on amazon-book-sample.
#   sweep-n    N in {8,12,16,20,24} (d = 8): each value but 16 trains its own stage 1:
#              ~4 x 75 min = 5 h on gowalla. Last, and only when asked (STEPS=sweep-n).
# Re-running resumes: sweep values whose result is saved are skipped; train resumes.
set -euo pipefail
PEEL=${PEEL:-.venv/bin/peel}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
GW_RUN=${GW_RUN:-/work/runs/gw_var/svdgT}            # seed 2024, the committed gowalla run
AB_RUN=${AB_RUN:-/work/runs/ab_s0}
ML_RUN=${ML_RUN:-/work/runs/ml_new_s0}                # seed 0, the committed ml-1m run
AB_DATA=${AB_DATA:-../shared/datasets/amazon-book-sample}
DATASETS=${DATASETS:-gowalla amazon-book-sample}
STEPS=${STEPS:-train-ab dynamic latency sweep-g}
DYN_BASELINES=${DYN_BASELINES:-lightgcn-svd,bpr-mf,pmf,lightgcn,dlrm-ce,lightrec,rule}
LAT_BASELINES=${LAT_BASELINES:-lightgcn-svd,dlrm-ce,lightrec,rule}
SWEEP_ROOT=${SWEEP_ROOT:-/work/runs/sweeps}            # run folders of the sweeps (large)

has() { [[ " $STEPS " == *" $1 "* ]]; }
run_of() {
  case "$1" in gowalla) echo "$GW_RUN" ;; ml-1m) echo "$ML_RUN" ;; *) echo "$AB_RUN" ;; esac
}

if has train-ab && [[ " $DATASETS " == *" amazon-book-sample "* ]]; then
  "$PEEL" train "$AB_DATA" --out "$AB_RUN" --seed 0 --quiet
fi

for ds in $DATASETS; do
  RUN=$(run_of "$ds")
  DOCS=docs/results/$ds
  if has dynamic; then
    "$PEEL" experiment dynamic "$RUN" --budgets 0.533,0.213,0.107,0.533 \
      --baselines "$DYN_BASELINES" --out "$DOCS/dynamic" --quiet
  fi
  if has latency; then
    "$PEEL" experiment latency "$RUN" --budgets 0.107,0.213,0.533 --users 200 \
      --baselines "$LAT_BASELINES" --out "$DOCS/latency" --quiet
  fi
  if has sweep-g; then
    for key in groups.n_item_groups groups.n_user_groups; do
      # the run folders stay out of docs/: only the report is moved in
      "$PEEL" experiment sweep "$RUN" --param "$key=5,10,15,20,25" --budget 0.213 \
        --out "$SWEEP_ROOT/$ds/$key" --quiet
      mkdir -p "$DOCS/sweep/$key"
      cp "$SWEEP_ROOT/$ds/$key"/{report.md,sweep.csv,sweep.json,*.png} "$DOCS/sweep/$key/"
    done
  fi
  if has sweep-n; then
    key=finetune.n_blocks
    "$PEEL" experiment sweep "$RUN" --param "$key=8,12,16,20,24" --budget 0.213 \
      --out "$SWEEP_ROOT/$ds/$key" --quiet
    mkdir -p "$DOCS/sweep/$key"
    cp "$SWEEP_ROOT/$ds/$key"/{report.md,sweep.csv,sweep.json,*.png} "$DOCS/sweep/$key/"
  fi
done
