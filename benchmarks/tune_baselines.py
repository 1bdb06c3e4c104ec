"""Validation tuning of the baselines of one run: the configured setting against the tuned one.

    python benchmarks/tune_baselines.py RUN --out FILE.json [--methods pmf,bpr-mf,lightgcn]
        [--budgets 0.107,0.213,0.533] [--trials 4]

For each method and budget this calls :func:`peel.tuning.tune` (the same trials as
``peel evaluate --baselines ... --tune-trials N``) on the run's data and [pretrain] settings,
and writes FILE.json: per method and budget, the size, the configured setting's validation
Recall@20 (trial 0), the tuned one, the chosen setting and every trial. Validation only: it
never reads the test split, so it may be used to choose settings.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--methods", default="pmf")
    ap.add_argument("--budgets", default="0.107,0.213,0.533")
    ap.add_argument("--trials", type=int, default=None, help="default: peel.tuning's")
    args = ap.parse_args()

    from peel import __version__
    from peel.baselines import check_names
    from peel.budget import full_table_bytes, parse_budget
    from peel.pipeline import load_run_config, run_data
    from peel.tuning import DEFAULT_TRIALS, tune

    methods = [m for m in args.methods.split(",") if m]
    check_names(methods, "--methods")
    trials = DEFAULT_TRIALS if args.trials is None else args.trials
    cfg = load_run_config(args.run)
    data = run_data(args.run, cfg)
    full = full_table_bytes(data.n_items, cfg.pretrain.dim)
    doc: dict = {"peel_version": __version__, "run": str(args.run), "dataset": data.name,
                 "split": "valid", "metric": "recall@20", "trials": trials,
                 "seed": cfg.run.seed, "methods": {}}
    t_all = time.perf_counter()
    for method in methods:
        for budget in args.budgets.split(","):
            nbytes = parse_budget(budget, full)
            model, log = tune(method, data, nbytes, cfg.pretrain, trials, seed=cfg.run.seed,
                              run=args.run)
            first = log["log"][0]
            doc["methods"].setdefault(method, {})[budget] = {
                "budget_bytes": nbytes, "bytes_used": model.bytes_used,
                "dim": model.params.get("dim"),
                "default_valid_recall@20": first["valid_recall@20"],
                "default": first["params"],
                "tuned_valid_recall@20": log["valid_recall@20"],
                "chosen": log["chosen"], "chosen_trial": log["chosen_trial"],
                "seconds": sum(t["seconds"] for t in log["log"]), "tuning": log,
            }
            print(f"{method} at {budget} ({model.params.get('dim')}-d): valid R@20 default "
                  f"{first['valid_recall@20']:.4f}, tuned {log['valid_recall@20']:.4f} "
                  f"{log['chosen']}", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(doc, indent=2) + "\n")  # after every cell
    doc["seconds"] = time.perf_counter() - t_all
    args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
