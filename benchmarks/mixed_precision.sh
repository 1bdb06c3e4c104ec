#!/usr/bin/env bash
# Mixed-precision packages (issue 20) on one trained run, one command:
#   benchmarks/mixed_precision.sh RUN WORK_DIR REPORT_DIR
# 1. validation only: every package precision rule at 10.7 / 21.3 / 53.3% of the table
#    (benchmarks/precision_rules.py; this is where `auto` was chosen) -> REPORT_DIR;
# 2. test, reporting: PEEL (fp32), PEEL (auto precision), LightGCN, LightGCN-fp16 and
#    LightGCN-int8 at each budget, per-user results and paired tests (budget_compare.py) in
#    WORK_DIR, the small files copied to REPORT_DIR, and REPORT_DIR/results.md with the targets.
# Wall-clock per step is appended to REPORT_DIR/timings.txt. Never writes into RUN.
#
# ml-1m (seed 0, run by the author):
#   benchmarks/mixed_precision.sh /work/runs/ml_new_s0 /work/runs/mixed_ml1m_cmp docs/results/ml-1m/mixed
# gowalla (seed 2024, for the lead; ~2.5-3 h on the 2-core box: eight LightGCN trainings at
# 13/27/68 (LightGCN), 27/54/128 (fp16) and 52/106 dims (int8; its 128 is shared with fp16)):
#   nice -n 5 benchmarks/mixed_precision.sh /work/runs/gw_var/svdgT /work/runs/mixed_gw_cmp docs/results/gowalla/mixed
set -euo pipefail
RUN=${1:?usage: mixed_precision.sh RUN WORK_DIR REPORT_DIR}
WORK=${2:?usage: mixed_precision.sh RUN WORK_DIR REPORT_DIR}
REPORT=${3:?usage: mixed_precision.sh RUN WORK_DIR REPORT_DIR}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
mkdir -p "$WORK" "$REPORT"
TIMES="$REPORT/timings.txt"
echo "# $(date -u +%FT%TZ) mixed_precision.sh $*" >> "$TIMES"

timed() {  # timed LABEL CMD...: run, append "LABEL: seconds" to the timings file
  local label=$1; shift
  local t0=$SECONDS
  "$@"
  echo "$label: $((SECONDS - t0)) s" >> "$TIMES"
}

timed "validation: precision rules" "$PY" benchmarks/precision_rules.py "$RUN" --out "$REPORT"
timed "test: PEEL fp32/auto + LightGCN fp32/fp16/int8" "$PY" benchmarks/budget_compare.py \
  "$RUN" --out "$WORK" --baselines lightgcn,lightgcn-fp16,lightgcn-int8 --precisions fp32,auto
"$PY" benchmarks/budget_compare.py --summarise "$WORK" --against "PEEL (auto precision)" \
  --keep-labels
cp "$WORK"/seed[0-9]*.json "$WORK"/seeds.json "$WORK"/paired.json "$WORK"/summary.md "$REPORT"/
"$PY" benchmarks/mixed_report.py "$REPORT"
