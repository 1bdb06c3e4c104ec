"""How much the Table III figures move across seeds: mean, spread and per-seed wins.

    python benchmarks/seed_spread.py RUN [RUN ...] [--metric recall@20] [--against PEEL]

Each RUN is a folder that ``peel evaluate --baselines`` has written ``eval.json`` into, trained
with a different ``--seed`` on the same data. One seed cannot tell a 0.01 gap from noise;
this prints, for every method and budget, the mean and sample standard deviation over the runs,
and for the ``--against`` method the per-seed difference to every other method, so a claim
such as "PEEL beats LightGCN at 21.3%" can be read as "in k of n seeds, by this much".
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def load_rows(run: Path) -> dict[tuple[str, str], dict[str, float]]:
    """(method, budget) -> metrics of one run's eval.json."""
    path = run / "eval.json"
    if not path.exists():
        raise SystemExit(f"{path}: missing; run `peel evaluate {run} --baselines` first")
    rows = json.loads(path.read_text())["rows"]
    return {(r["method"], r["budget"]): r["metrics"] for r in rows}


def seed_of(run: Path) -> str:
    meta = run / "run.json"
    return str(json.loads(meta.read_text()).get("seed", "?")) if meta.exists() else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--metric", default="recall@20")
    ap.add_argument("--against", default="PEEL", help="the method compared with every other")
    args = ap.parse_args()
    per_run = [load_rows(r) for r in args.runs]
    seeds = [seed_of(r) for r in args.runs]
    keys = sorted(set.intersection(*(set(rows) for rows in per_run)),
                  key=lambda k: (float(k[1]), k[0]))
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for rows in per_run:
        for key in keys:
            values[key].append(rows[key][args.metric])
    print(f"{args.metric} over seeds {', '.join(seeds)} ({len(per_run)} runs)\n")
    print("| budget | method | mean | sd | per seed |")
    print("|---|---|---|---|---|")
    for budget, method in ((k[1], k[0]) for k in keys):
        v = values[(method, budget)]
        sd = statistics.stdev(v) if len(v) > 1 else float("nan")
        print(f"| {budget} | {method} | {statistics.fmean(v):.4f} | {sd:.4f} | "
              + " / ".join(f"{x:.4f}" for x in v) + " |")
    print(f"\n{args.against} minus each method, per seed (wins = seeds where it is higher)\n")
    print("| budget | method | mean diff | per seed | wins |")
    print("|---|---|---|---|---|")
    for budget, method in ((k[1], k[0]) for k in keys):
        if method == args.against or (args.against, budget) not in values:
            continue
        diff = [a - b for a, b in zip(values[(args.against, budget)],
                                      values[(method, budget)], strict=True)]
        wins = sum(d > 0 for d in diff)
        print(f"| {budget} | {method} | {statistics.fmean(diff):+.4f} | "
              + " / ".join(f"{d:+.4f}" for d in diff) + f" | {wins} of {len(diff)} |")


if __name__ == "__main__":
    main()
