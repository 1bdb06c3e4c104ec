#!/usr/bin/env bash
# RULE vs PEEL on ml-1m, seeds 0-2, test split (reporting only: RULE's own choices use the
# validation split). Stage 1 of each seed is the PEEL run's (/work/runs/ml_new_sS).
#   benchmarks/rule_ml1m.sh [RUNS_DIR] [OUT] [budget_compare args, default
#                           --baselines rule,lightgcn-svd]
#   -> OUT/seedS.json, per_user_seedS.npz, seeds.json, paired.json, summary.md
# docs/results/ml-1m/rule:            benchmarks/rule_ml1m.sh /work/runs /work/runs/rule_ml_cmp
# docs/results/ml-1m/rule/cycles1000: benchmarks/rule_ml1m.sh /work/runs \
#     /work/runs/rule_ml_cmp1000 --baselines rule --rule cycles=1000
set -euo pipefail
RUNS=${1:-/work/runs}
OUT=${2:-/work/runs/rule_ml_cmp}
shift $(( $# < 2 ? $# : 2 ))
ARGS=("$@")
[ ${#ARGS[@]} -gt 0 ] || ARGS=(--baselines rule,lightgcn-svd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
for S in 0 1 2; do
  /usr/bin/time -v nice -n 5 "$PY" benchmarks/budget_compare.py "$RUNS/ml_new_s$S" --out "$OUT" \
    "${ARGS[@]}" 2> "$OUT.s$S.time" | tee "$OUT.s$S.log"
done
"$PY" benchmarks/budget_compare.py --summarise "$OUT"
