#!/usr/bin/env bash
# The baselines of a trained run, each tuned on validation (issue 13), then the report:
#   benchmarks/tuned_baselines.sh RUN REPORT_DIR [TRIALS]
# e.g. for gowalla (the lead runs this; hours on the 2-core box, see docs/paper-notes.md):
#   benchmarks/tuned_baselines.sh /work/runs/gw_new docs/results/gowalla 4
# One `peel evaluate` per method and budget, so every finished cell is saved in RUN/eval.json
# (re-running the script redoes only what is asked; rows are merged by method and budget).
# PMF, BPR-MF and LightGCN get TRIALS validation trials each per budget (peel.tuning);
# lightgcn-svd has nothing to tune. The last call adds PEEL with every block kept and the
# pretrained model (--reference). Seconds per call go to REPORT/timings_tuned.txt.
set -euo pipefail
RUN=${1:?usage: tuned_baselines.sh RUN REPORT_DIR [TRIALS]}
REPORT=${2:?usage: tuned_baselines.sh RUN REPORT_DIR [TRIALS]}
TRIALS=${3:-4}
PEEL=${PEEL:-peel}
BUDGETS=${BUDGETS:-0.107 0.213 0.533}
mkdir -p "$REPORT"
TIMES="$REPORT/timings_tuned.txt"
echo "# $(date -u +%FT%TZ) tuned_baselines.sh $*" >> "$TIMES"
for method in lightgcn-svd pmf bpr-mf lightgcn; do
  for budget in $BUDGETS; do
    t0=$SECONDS
    "$PEEL" evaluate "$RUN" --baselines "$method" --budgets "$budget" \
      --tune-trials "$TRIALS" --quiet > /dev/null
    echo "evaluate $method at $budget ($TRIALS trials): $((SECONDS - t0)) s" >> "$TIMES"
  done
done
t0=$SECONDS
"$PEEL" evaluate "$RUN" --reference --quiet > /dev/null
echo "evaluate PEEL + reference rows: $((SECONDS - t0)) s" >> "$TIMES"
"$PEEL" report "$RUN" --out "$REPORT"
