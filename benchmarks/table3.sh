#!/usr/bin/env bash
# The paper's Table III protocol and ablations (Section V-B, V-E) on one dataset, one command:
#   benchmarks/table3.sh ../shared/datasets/ml-1m runs/ml-1m docs/results/ml-1m
# Trains PEEL (default config), evaluates it at the paper's budgets with every baseline of
# Table III (BASELINES, default: the fixed-size PMF, BPR-MF and LightGCN, the compression rows
# DLRM-CE and LightRec, the multi-dimensional rows ESAPN and AutoEmb, and RULE; plus
# lightgcn-svd), each tuned on validation with TRIALS trials per budget (default 4,
# peel.tuning; a method with nothing to tune is fitted once), PEEL with every block kept and
# the pretrained model (--reference), the
# w/o Importance Weight ablation (random block selection) and PEEL with
# the paper's literal Eq. 10 factor (--scale eq10), trains the three training-time
# ablations (cheapest first), and writes the report (Markdown, CSV, JSON, PNG) to REPORT.
# PEEL's stage 1 gets the same budget as the baselines: TRIALS trials of its recipe (the
# configured one and the LightGCN baseline's draws, `--set pretrain.trials`), in every run.
# Then the paper's other experiments as report folders in REPORT (EXPERIMENTS, default all
# four; "" skips them): dynamic budgets (RQ2, Fig. 3) -> REPORT/dynamic, on-device latency
# (RQ5, Table IV) -> REPORT/latency, and the hyper-parameter sweeps (RQ3, Fig. 5) of G_v, G_u
# (stage 1 reused) and N (its own stage 1 per value) -> REPORT/sweep/KEY, at 21.3%, their run
# folders in RUNS_DIR/sweeps. Every method of BASELINES takes part in dynamic and latency.
# Every stage's wall-clock goes to REPORT/timings.txt. Re-running resumes finished stages
# (train, sweep values); evaluate and the dynamic / latency experiments run again.
set -euo pipefail
DATA=${1:?usage: table3.sh DATA RUNS_DIR REPORT_DIR [SEED]}
RUNS=${2:?usage: table3.sh DATA RUNS_DIR REPORT_DIR [SEED]}
REPORT=${3:?usage: table3.sh DATA RUNS_DIR REPORT_DIR [SEED]}
SEED=${4:-0}
PEEL=${PEEL:-peel}
TRIALS=${TRIALS:-4}
BASELINES=${BASELINES:-lightgcn-svd,pmf,bpr-mf,lightgcn,dlrm-ce,lightrec,esapn,autoemb,rule}
EXPERIMENTS=${EXPERIMENTS-dynamic latency sweep-g sweep-n}
mkdir -p "$RUNS" "$REPORT"
TIMES="$REPORT/timings.txt"
echo "# $(date -u +%FT%TZ) table3.sh $*" >> "$TIMES"  # appends: a resumed run keeps earlier lines

timed() {  # timed LABEL CMD...: run, append "LABEL seconds" to the timings file
  local label=$1; shift
  local t0=$SECONDS
  "$@"
  echo "$label: $((SECONDS - t0)) s" >> "$TIMES"
}

timed "train PEEL" "$PEEL" train "$DATA" --out "$RUNS/peel" --seed "$SEED" \
  --set "pretrain.trials=$TRIALS" --quiet
# Cheapest first: w/o PopSeg and w/o User Clustering change only later stages, so they reuse
# PEEL's stage 1; the baselines (six full trainings) next; w/o Regularizer (its own stage 1) last.
ablation() {  # ablation NAME SECTION.KEY=VALUE [train options...]
  local name=$1 setting=$2; shift 2
  timed "train w/o $name" "$PEEL" train "$DATA" --out "$RUNS/wo_$name" --set "$setting" "$@" \
    --set "pretrain.trials=$TRIALS" --label "w/o $name" --seed "$SEED" --quiet
  timed "evaluate w/o $name" "$PEEL" evaluate "$RUNS/wo_$name" --quiet
}
ablation popseg groups.item_grouping=random --reuse-pretrain "$RUNS/peel"
ablation clustering groups.user_grouping=single --reuse-pretrain "$RUNS/peel"
timed "evaluate PEEL + tuned baselines + reference + random selection + Eq. 10 factor" \
  "$PEEL" evaluate "$RUNS/peel" --baselines "$BASELINES" --tune-trials "$TRIALS" \
  --reference --selection random --scale eq10 --quiet
ablation reg pretrain.diversity=0
"$PEEL" report "$RUNS/peel" "$RUNS/wo_popseg" "$RUNS/wo_reg" "$RUNS/wo_clustering" \
  --out "$REPORT"
for run in peel wo_popseg wo_reg wo_clustering; do  # per-stage seconds of every train
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); \
print(sys.argv[2], json.dumps(d['seconds']))" "$RUNS/$run/train_summary.json" "$run" \
    >> "$TIMES"
done
has() { [[ " $EXPERIMENTS " == *" $1 "* ]]; }
if has dynamic; then
  timed "experiment dynamic" "$PEEL" experiment dynamic "$RUNS/peel" \
    --budgets 0.533,0.213,0.107,0.533 --baselines "$BASELINES" --out "$REPORT/dynamic" --quiet
fi
if has latency; then
  timed "experiment latency" "$PEEL" experiment latency "$RUNS/peel" \
    --budgets 0.107,0.213,0.533 --baselines "$BASELINES" --out "$REPORT/latency" --quiet
fi
sweep() {  # sweep KEY VALUES: run folders under RUNS, the report copied into REPORT/sweep/KEY
  timed "experiment sweep $1" "$PEEL" experiment sweep "$RUNS/peel" --param "$1=$2" \
    --budget 0.213 --out "$RUNS/sweeps/$1" --quiet
  mkdir -p "$REPORT/sweep/$1"
  cp "$RUNS/sweeps/$1"/{report.md,sweep.csv,sweep.json} "$REPORT/sweep/$1/"
  cp "$RUNS/sweeps/$1"/*.png "$REPORT/sweep/$1/" 2>/dev/null || true
}
if has sweep-g; then
  sweep groups.n_item_groups 5,10,15,20,25
  sweep groups.n_user_groups 5,10,15,20,25
fi
if has sweep-n; then
  sweep finetune.n_blocks 8,12,16,20,24
fi
cat "$TIMES"
