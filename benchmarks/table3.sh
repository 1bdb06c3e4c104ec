#!/usr/bin/env bash
# The paper's Table III protocol and ablations (Section V-B, V-E) on one dataset, one command:
#   benchmarks/table3.sh ../shared/datasets/ml-1m runs/ml-1m docs/results/ml-1m
# Trains PEEL (default config), evaluates it at the paper's budgets with the fixed-size PMF and
# LightGCN baselines and the w/o Importance Weight ablation (random block selection), trains the
# three training-time ablations, and writes the report (Markdown, CSV, JSON, PNG) to REPORT.
# Every stage's wall-clock goes to REPORT/timings.txt. Re-running resumes finished stages.
set -euo pipefail
DATA=${1:?usage: table3.sh DATA RUNS_DIR REPORT_DIR [SEED]}
RUNS=${2:?usage: table3.sh DATA RUNS_DIR REPORT_DIR [SEED]}
REPORT=${3:?usage: table3.sh DATA RUNS_DIR REPORT_DIR [SEED]}
SEED=${4:-0}
PEEL=${PEEL:-peel}
mkdir -p "$RUNS" "$REPORT"
TIMES="$REPORT/timings.txt"
: > "$TIMES"

timed() {  # timed LABEL CMD...: run, append "LABEL seconds" to the timings file
  local label=$1; shift
  local t0=$SECONDS
  "$@"
  echo "$label: $((SECONDS - t0)) s" >> "$TIMES"
}

timed "train PEEL" "$PEEL" train "$DATA" --out "$RUNS/peel" --seed "$SEED" --quiet
timed "evaluate PEEL + baselines + random selection" \
  "$PEEL" evaluate "$RUNS/peel" --baselines --selection random --quiet
# w/o PopSeg and w/o User Clustering change only later stages: they reuse PEEL's stage 1
for ablation in "popseg groups.item_grouping=random --reuse-pretrain $RUNS/peel" \
                "reg pretrain.diversity=0" \
                "clustering groups.user_grouping=single --reuse-pretrain $RUNS/peel"; do
  set -- $ablation
  timed "train w/o $1" "$PEEL" train "$DATA" --out "$RUNS/wo_$1" --set "$2" "${@:3}" \
    --label "w/o $1" --seed "$SEED" --quiet
  timed "evaluate w/o $1" "$PEEL" evaluate "$RUNS/wo_$1" --quiet
done
"$PEEL" report "$RUNS/peel" "$RUNS/wo_popseg" "$RUNS/wo_reg" "$RUNS/wo_clustering" \
  --out "$REPORT"
for run in peel wo_popseg wo_reg wo_clustering; do  # per-stage seconds of every train
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); \
print(sys.argv[2], json.dumps(d['seconds']))" "$RUNS/$run/train_summary.json" "$run" \
    >> "$TIMES"
done
cat "$TIMES"
