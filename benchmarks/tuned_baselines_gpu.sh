#!/usr/bin/env bash
# The tuning half of tuned_baselines.sh on a machine with a GPU and many cores:
#   benchmarks/tuned_baselines_gpu.sh OUT_DIR DEADLINE_S RUN_COPY[:WORKERS]...
# Each RUN_COPY holds a run's config.toml, run.json, data.json and partition.npz (no group
# files: `peel evaluate --baselines-only` needs none) and finds its data where its config says.
# The copies run side by side, each with WORKERS processes (default 8); each process fits one
# tuning trial at a time (peel.pipeline.TrialTask) on the GPU if there is one. One
# `peel evaluate` per method, slowest first, so every finished method is saved in the copy's
# eval.json; at DEADLINE_S seconds whatever is unfinished is stopped, and each copy's
# eval.json and log go to OUT_DIR. Back home: `peel evaluate RUN --merge OUT_DIR/NAME.eval.json`,
# then tuned_baselines.sh's last steps (lightgcn-svd, --reference, report) on the full run.
# Env: PY (default python3), TRIALS (4), METHODS ("lightgcn bpr-mf pmf"),
# BUDGETS (0.107,0.213,0.533).
set -uo pipefail
OUT=${1:?usage: tuned_baselines_gpu.sh OUT_DIR DEADLINE_S RUN_COPY[:WORKERS]...}
DEADLINE=${2:?deadline in seconds}
shift 2
PY=${PY:-python3}
TRIALS=${TRIALS:-4}
METHODS=${METHODS:-lightgcn bpr-mf pmf}
BUDGETS=${BUDGETS:-0.107,0.213,0.533}
HERE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
pids=()
for spec in "$@"; do
  run=${spec%%:*}
  workers=8
  [[ $spec == *:* ]] && workers=${spec##*:}
  name=$(basename "$run")
  (
    for method in $METHODS; do
      t0=$SECONDS
      PYTHONPATH="$HERE/src" PYTHONUNBUFFERED=1 "$PY" -c \
        "import sys; from peel.cli import main; sys.exit(main())" evaluate "$run" \
        --baselines "$method" --budgets "$BUDGETS" --tune-trials "$TRIALS" \
        --baselines-only --workers "$workers" --quiet
      echo "[$name] $method: rc=$? in $((SECONDS - t0)) s" >&2
    done
  ) > "$OUT/$name.log" 2>&1 &
  pids+=($!)
done
# The watchdog writes nowhere: a pipe it held open kept `... | tee` waiting for its sleep.
( sleep "$DEADLINE"; for p in "${pids[@]}"; do pkill -TERM -P "$p"; kill "$p"; done ) \
  > /dev/null 2>&1 &
watchdog=$!
wait "${pids[@]}" 2>/dev/null
pkill -P "$watchdog" 2>/dev/null
kill "$watchdog" 2>/dev/null
for spec in "$@"; do
  run=${spec%%:*}
  name=$(basename "$run")
  [[ -f $run/eval.json ]] && cp "$run/eval.json" "$OUT/$name.eval.json"
  grep -E "^\[$name\]|Error|error" "$OUT/$name.log" | tail -n 20
done
