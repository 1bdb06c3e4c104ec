"""Deployed validation metrics of a trained run under each way of building packages.

    python benchmarks/deploy_variants.py RUN [--split valid] [--budgets 0.107,0.213,0.533]
                                         [--only-default]

Every user group of RUN is packaged with the real package writer and ranked by the device
runtime (Eq. 10, train items excluded) by ``peel evaluate``'s own code, for every
combination of Eq. 10's ``scale`` (the paper's factor max_k |S_k| / |S_g|, or none), the
deployed block ``weighting`` (none / alpha) and the block ``selection`` (importance / random).
The decisions in docs/paper-notes.md (Stage 2, "Eq. 10's factor") were made from this table
on the validation split; use ``--split test`` only to report, never to choose.
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import replace
from pathlib import Path

from peel.budget import SCALES, SELECTIONS, WEIGHTINGS
from peel.pipeline import deploy_options, evaluate_peel, load_run_config, run_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run folder written by peel train")
    ap.add_argument("--split", default="valid", choices=("valid", "test"))
    ap.add_argument("--budgets", default="0.107,0.213,0.533",
                    help="fractions of the full item table")
    ap.add_argument("--only-default", action="store_true",
                    help="only the run's own deployment settings (for quick training sweeps)")
    args = ap.parse_args()
    cfg = load_run_config(args.run)
    data = run_data(args.run, cfg)  # refused if the data changed since training
    budgets = sorted(args.budgets.split(","), key=float)
    print(f"{args.run} ({data.name}), {args.split} split, budgets {', '.join(budgets)}; "
          f"Recall@20 and NDCG@50 per budget")
    print("| selection | weighting | scale | " + " | ".join(
        f"R@20 {b}" for b in budgets) + " | " + " | ".join(
        f"N@50 {b}" for b in budgets) + " | seconds |")
    print("|" + "---|" * (4 + 2 * len(budgets)))
    combos = list(itertools.product(SELECTIONS, WEIGHTINGS, SCALES))
    if args.only_default:
        own = deploy_options(cfg)
        combos = [(own.selection, own.weighting, own.scale)]
    for selection, weighting, scale in combos:
        if selection == "random" and weighting == "alpha":
            continue  # random order ignores alpha; weighting by it is not a meaningful pair
        t0 = time.perf_counter()
        deploy = replace(cfg.deploy, selection=selection, weighting=weighting, scale=scale)
        rows = {r.budget: r.metrics for r in
                evaluate_peel(args.run, data, replace(cfg, deploy=deploy), budgets, args.split)}
        cells = [f"{rows[b]['recall@20']:.4f}" for b in budgets]
        cells += [f"{rows[b]['ndcg@50']:.4f}" for b in budgets]
        print(f"| {selection} | {weighting} | {scale} | " + " | ".join(cells)
              + f" | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
