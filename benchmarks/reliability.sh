#!/usr/bin/env bash
# Issue 15's probe, re-run: bad or unusual inputs against the `peel` command line.
#   benchmarks/reliability.sh            # uses .venv/bin/peel
#   PEEL="python -m peel.cli" benchmarks/reliability.sh
# Everything runs on small generated data in a temporary folder (no real datasets), each case
# under a timeout; a full run takes about a minute on 2 cores. Prints one line per case and the
# counts of tracebacks, hangs, silent wrong results, unhelpful messages and leaked worker
# processes: all 0 when every case is handled. Exit status: 0 when all counts are 0, else 1.
set -uo pipefail
PEEL=${PEEL:-.venv/bin/peel}
PYTHON=${PYTHON:-.venv/bin/python}
CASE_TIMEOUT=${CASE_TIMEOUT:-30}
T=$(mktemp -d "${TMPDIR:-/tmp}/peel-reliability.XXXXXX")
BG_PIDS=()
cleanup() {
  for pid in "${BG_PIDS[@]}"; do kill -9 "$pid" 2>/dev/null; done
  rm -rf "$T"
}
trap cleanup EXIT
export PEEL_CACHE_DIR="$T/cache"

tracebacks=0 hangs=0 silent=0 unhelpful=0 leaked=0 passed=0

# ---------------------------------------------------------------- fixtures (one Python call)
"$PYTHON" - "$T" <<'PY' || { echo "fixture generation failed"; exit 1; }
import hashlib
import json
import sys
from pathlib import Path

from peel.budget import PREAMBLE
from peel.synthetic import SyntheticConfig, make_demo, write_lightgcn_folder

t = Path(sys.argv[1])
tiny = make_demo(SyntheticConfig(n_users=80, n_items=60, n_communities=2, n_topics=4,
                                 mean_interactions=10, seed=1))
write_lightgcn_folder(tiny, str(t / "data"))
mid = make_demo(SyntheticConfig(n_users=600, n_items=300, n_communities=4, n_topics=8,
                                mean_interactions=25, seed=2))
write_lightgcn_folder(mid, str(t / "mid"))
base = """[run]
workers = {workers}
[pretrain]
dim = 16
block_dim = 8
layers = 1
epochs = {pre_epochs}
batch_size = 2048
patience = 1
[groups]
n_user_groups = {groups}
n_item_groups = 2
[finetune]
n_blocks = 2
block_dim = 8
max_epochs = {ft_epochs}
patience = {ft_epochs}
eval_users = 50
[deploy]
budgets = ["0.5"]
baselines = []
"""
(t / "tiny.toml").write_text(base.format(workers=1, pre_epochs=1, groups=2, ft_epochs=1))
(t / "slow.toml").write_text(base.format(workers=2, pre_epochs=2, groups=6, ft_epochs=60))
for name, text in {
    "six.toml": '[groups]\nn_user_groups = "six"\n',
    "two.toml": '[run]\nworkers = "two"\n',
}.items():
    (t / name).write_text(text)
tiny_cfg = (t / "tiny.toml").read_text()  # so that old code finishes (exit 0) instead of training
(t / "epochs_float.toml").write_text(tiny_cfg.replace("epochs = 1\n", "epochs = 2.5\n", 1))
(t / "epochs_bool.toml").write_text(tiny_cfg.replace("epochs = 1\n", "epochs = true\n", 1))
for name, line in {"nonascii": "0 1 \u0663\n", "bigid": "0 1 12345678901234567890\n"}.items():
    (t / name).mkdir()
    (t / name / "train.txt").write_text("1 2 3\n" + line, encoding="utf-8")
(t / "dirtrain" / "train.txt").mkdir(parents=True)
(t / "r.csv").write_text("user,item,rating\n1,2,5\n1,3,4\n2,3,5\n2,1,2\n")
(t / "extra.csv").write_text("1,2,5,100,x\n1,3,4,101,y\n2,3,5,102,z\n")
(t / "latin1.csv").write_bytes(b"user,item\n1,2\n\xf8,3\n")
with open(t / "oneline.txt", "wb") as fh:  # 20 MB, no newline
    for _ in range(20):
        fh.write(b"7" * (1 << 20))
header = b"[" * 100_000 + b"]" * 100_000
start = 64 + -(-len(header) // 64) * 64
body = header + b" " * (start - 64 - len(header))
pre = PREAMBLE.pack(b"PEELPKG\x00", 3, len(header), 0, 1000, bytes(32))
digest = hashlib.sha256(pre[:32]); digest.update(body)
(t / "deep.peel").write_bytes(pre[:32] + digest.digest() + body)
(t / "badeval" ).mkdir()
(t / "badeval" / "eval.json").write_text(json.dumps({"rows": [{"method": "PEEL"}]}))
(t / "taken").write_text("a file, not a folder")
PY

# ---------------------------------------------------------------- case runner
# expect_error NAME NEEDLE CMD...: the command must fail (non-zero, no traceback, within the
# timeout) with a message containing NEEDLE (the file, line or value at fault).
expect_error() {
  local name=$1 needle=$2; shift 2
  local err="$T/err.txt" code
  # shellcheck disable=SC2086  # $PEEL may be several words ("python -m peel.cli")
  timeout -s KILL "$CASE_TIMEOUT" $PEEL "$@" >"$T/out.txt" 2>"$err" </dev/null 3>&- &
  wait $! 2>/dev/null
  code=$?
  if { [ "$code" -eq 137 ] || [ "$code" -eq 124 ]; } && [ "${TIMEOUT_MEANS:-}" = silent ]; then
    silent=$((silent + 1)); echo "SILENT     $name (still working after ${CASE_TIMEOUT}s)"
  elif [ "$code" -eq 137 ] || [ "$code" -eq 124 ]; then
    hangs=$((hangs + 1)); echo "HANG       $name (no exit in ${CASE_TIMEOUT}s)"
  elif grep -q "Traceback" "$err"; then
    tracebacks=$((tracebacks + 1)); echo "TRACEBACK  $name: $(tail -n 1 "$err")"
  elif [ "$code" -eq 0 ]; then
    silent=$((silent + 1)); echo "SILENT     $name (exit 0, expected an error)"
  elif ! grep -qF -- "$needle" "$err" || [ "$(wc -l <"$err")" -gt 1 ]; then
    unhelpful=$((unhelpful + 1)); echo "UNHELPFUL  $name: $(head -c 300 "$err")"
  else
    passed=$((passed + 1)); echo "ok         $name: $(head -c 160 "$err")"
  fi
}

expect_ok() {
  local name=$1; shift
  # shellcheck disable=SC2086
  timeout -s KILL "$CASE_TIMEOUT" $PEEL "$@" >"$T/out.txt" 2>"$T/err.txt" </dev/null
  local code=$?
  if [ "$code" -eq 137 ] || [ "$code" -eq 124 ]; then
    hangs=$((hangs + 1)); echo "HANG       $name"
  elif [ "$code" -ne 0 ]; then
    if grep -q Traceback "$T/err.txt"; then tracebacks=$((tracebacks + 1)); fi
    silent=$((silent + 1)); echo "FAILED     $name (exit $code): $(tail -n 1 "$T/err.txt")"
  else
    passed=$((passed + 1)); echo "ok         $name"
  fi
}

alive() {  # alive PID: running and not a zombie
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != "Z" ]
}

echo "# peel reliability probe, $(date -u +%FT%TZ), $($PEEL --version 2>&1)"
echo "## setup: a tiny trained run and a user package"
expect_ok "train tiny run" train "$T/data" --out "$T/run" --config "$T/tiny.toml" --quiet
expect_ok "deploy a user package" deploy "$T/run" --budget 64KB --user 1 --out "$T/u.peel"
"$PYTHON" - "$T" <<'PY'
import hashlib, sys
from pathlib import Path
import numpy as np
from peel.device import open_package
t = Path(sys.argv[1])
pkg = open_package(t / "u.peel")
data = bytearray((t / "u.peel").read_bytes())
at = pkg.layout.data_start + pkg.layout.slot("blocks").offset
data[at: at + 4] = np.float32(np.nan).tobytes()
digest = hashlib.sha256(bytes(data[:32])); digest.update(bytes(data[64:]))
data[32:64] = digest.digest()
(t / "nan.peel").write_bytes(bytes(data))
PY

echo "## 4: tracebacks"
expect_error "train --out is a file" "$T/taken" train "$T/data" --out "$T/taken" --config "$T/tiny.toml" --quiet
expect_error "train --out below a file" "$T/taken/run" train "$T/data" --out "$T/taken/run" --config "$T/tiny.toml" --quiet
expect_error "pretrain --out is a file" "$T/taken" pretrain "$T/data" --out "$T/taken" --epochs 1 --dim 16 --quiet
expect_error "report --out is a file" "$T/taken" report "$T/run" --out "$T/taken"
if [ "$(id -u)" -ne 0 ]; then
  cp -r "$T/run" "$T/ro_run" && chmod -R a-w "$T/ro_run"
  expect_error "evaluate unwritable run folder" "$T/ro_run" evaluate "$T/ro_run" --quiet
  chmod -R u+w "$T/ro_run"
fi
expect_error 'config n_user_groups = "six"' "n_user_groups" train "$T/data" --out "$T/r_six" --config "$T/six.toml" --quiet
expect_error 'config workers = "two"' "workers" train "$T/data" --out "$T/r_two" --config "$T/two.toml" --quiet
expect_error "shrink --budget 2^64" "18446744073709551616" shrink "$T/u.peel" --budget 18446744073709551616 --out "$T/s.peel"
expect_error "recommend --budget 2^64" "18446744073709551616" recommend "$T/u.peel" --budget 18446744073709551616
expect_error "train.txt with a non-ASCII digit" "train.txt:2" data stats "$T/nonascii" --no-cache
expect_error "train.txt with a 20-digit id" "12345678901234567890" data stats "$T/bigid" --no-cache
expect_error "train.txt is a folder" "train.txt" data stats "$T/dirtrain" --no-cache
expect_error "package header nested 100k deep" "deep.peel" recommend "$T/deep.peel"
expect_error "recommend --exclude with a huge id" "--exclude" recommend "$T/u.peel" --exclude "1,99999999999999999999999"
expect_error "report on a malformed eval.json" "eval.json" report "$T/badeval" --out "$T/rep"

echo "## 5: hangs and unbounded memory"
mkfifo "$T/fifo" "$T/fifo.peel"
expect_error "FIFO as data" "FIFO" data stats "$T/fifo" --no-cache
expect_error "FIFO as package" "FIFO" recommend "$T/fifo.peel"
expect_error "FIFO as config" "FIFO" train demo --out "$T/r_fifo" --config "$T/fifo"
expect_error "/dev/zero as data" "/dev/zero" data stats /dev/zero --no-cache
/usr/bin/time -f "%M" -o "$T/rss.txt" timeout -s KILL "$CASE_TIMEOUT" $PEEL data stats \
  "$T/oneline.txt" --no-cache >/dev/null 2>&1
rss_kb=$(tail -n 1 "$T/rss.txt" 2>/dev/null)
expect_error "20 MB file without newlines" "line longer than" data stats "$T/oneline.txt" --no-cache
if [[ "$rss_kb" =~ ^[0-9]+$ ]] && [ "$rss_kb" -gt 400000 ]; then
  hangs=$((hangs + 1)); echo "MEMORY     20 MB one-line file: peak RSS ${rss_kb} kB"
else
  echo "ok         20 MB one-line file: peak RSS ${rss_kb} kB"
fi

echo "## 7: silently accepted"
expect_error "config epochs = 2.5" "epochs" train "$T/data" --out "$T/r_e1" --config "$T/epochs_float.toml" --quiet
expect_error "config epochs = true" "epochs" train "$T/data" --out "$T/r_e2" --config "$T/epochs_bool.toml" --quiet
expect_error "NaN in a re-signed package: recommend" "finite" recommend "$T/nan.peel"
expect_error "NaN in a re-signed package: shrink" "finite" shrink "$T/nan.peel" --budget 64KB --out "$T/nan_small.peel"
expect_error "--rating-threshold nan" "nan" data stats "$T/r.csv" --no-cache --rating-threshold nan
expect_error "extra CSV columns" "extra.csv:1" data stats "$T/extra.csv" --no-cache
expect_error "--split files on one CSV" "--split" data stats "$T/r.csv" --no-cache --split files

echo "## 8: messages"
expect_error "non-UTF-8 byte in data" "latin1.csv:3" data stats "$T/latin1.csv" --no-cache
expect_error "--format lightgcn on a CSV" "--format lightgcn" data stats "$T/r.csv" --no-cache --format lightgcn
expect_error "--seed beyond 64 bits" "seed" pretrain "$T/data" --out "$T/r_seed" --seed 100000000000000000000 --epochs 1 --dim 16 --quiet

echo "## 3: concurrent runs, kill -9 during fine-tuning"
$PEEL train "$T/mid" --out "$T/slow" --config "$T/slow.toml" --quiet >"$T/slow.log" 2>&1 &
TRAIN=$!
BG_PIDS+=("$TRAIN")
workers=""
for _ in $(seq 1 240); do  # up to 120 s for pretraining to end and the workers to start
  for child in $(pgrep -P "$TRAIN"); do
    if grep -q "spawn_main" "/proc/$child/cmdline" 2>/dev/null; then workers="$workers $child"; fi
  done
  [ -n "$workers" ] && break
  if ! kill -0 "$TRAIN" 2>/dev/null; then break; fi
  sleep 0.5
done
if [ -z "$workers" ]; then
  silent=$((silent + 1)); echo "FAILED     no fine-tuning workers seen: $(tail -n 2 "$T/slow.log")"
else
  sleep 3  # let the workers initialise and start writing
  workers=$(for child in $(pgrep -P "$TRAIN"); do
    grep -q spawn_main "/proc/$child/cmdline" 2>/dev/null && echo "$child"; done | xargs)
  TIMEOUT_MEANS=silent expect_error "second peel train into the same --out" "pid $TRAIN" train "$T/mid" --out "$T/slow" --config "$T/slow.toml" --quiet
  kill -9 "$TRAIN"
  wait "$TRAIN" 2>/dev/null
  sleep 5
  n=0
  for pid in $workers; do
    if alive "$pid"; then n=$((n + 1)); kill -9 "$pid" 2>/dev/null; fi
  done
  leaked=$((leaked + n))
  if [ "$n" -eq 0 ]; then echo "ok         kill -9 during fine-tuning: workers ($workers ) ended with it"
  else echo "LEAKED     kill -9 during fine-tuning: $n of the workers ($workers ) still running"; fi
  # The re-run resumes: a lock file left by the killed run is taken over.
  sed -i 's/^max_epochs = .*/max_epochs = 1/; s/^patience = 60/patience = 1/' "$T/slow.toml"
  expect_error "re-run after kill -9 takes over the stale lock (reaches the config check)" "different configuration" train "$T/mid" --out "$T/slow" --config "$T/slow.toml" --quiet
fi

echo
echo "cases passed: $passed"
echo "tracebacks: $tracebacks"
echo "hangs (or unbounded memory): $hangs"
echo "silent wrong results: $silent"
echo "unhelpful messages: $unhelpful"
echo "leaked processes: $leaked"
[ $((tracebacks + hangs + silent + unhelpful + leaked)) -eq 0 ]
