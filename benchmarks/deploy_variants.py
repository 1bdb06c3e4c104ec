"""Deployed validation metrics of a trained run under each way of building packages.

    python benchmarks/deploy_variants.py RUN [--split valid] [--budgets 0.107,0.213,0.533]

Every user group of RUN is packaged with the real package writer and ranked by the device
runtime (Eq. 10, train items excluded), exactly as ``peel evaluate`` does, for every
combination of Eq. 10's ``scale`` (the paper's factor max_k |S_k| / |S_g|, or none), the
deployed block ``weighting`` (none / alpha) and the block ``selection`` (importance / random).
The decisions in docs/paper-notes.md ("Deployment") were made from this table on the
validation split; use ``--split test`` only to report, never to choose.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np

from peel.budget import SCALES, SELECTIONS, WEIGHTINGS, parse_budget
from peel.data import InteractionData
from peel.device import open_package
from peel.eval import metrics_from_topk
from peel.package import DeployOptions, build_package, group_files, load_group
from peel.pipeline import RunConfig, full_table_bytes, load_data, load_run_config


def evaluate_variant(run: Path, options: DeployOptions, budgets: list[float], split: str,
                     data: InteractionData, cfg: RunConfig) -> dict[float, dict[str, float]]:
    """Mean metrics per budget over every user with ``split`` items, packages shrunk from the
    largest budget (as the device would)."""
    truth, seen = data.split_matrix(split), data.seen_matrix(split)
    full = full_table_bytes(data, cfg.pretrain.dim)
    sized = sorted(budgets, reverse=True)
    per: dict[float, dict[str, list[np.ndarray]]] = {b: {} for b in sized}
    with tempfile.TemporaryDirectory() as tmp:
        for g, _ in group_files(run):
            arrays = load_group(run, g)
            has = truth.getnnz(axis=1)[arrays.users] > 0
            if not has.any():
                continue
            users, vectors = arrays.users[has], arrays.user_emb[has]
            rows = seen[users]
            path = Path(tmp) / f"g{g}.peel"
            build_package(path, arrays, parse_budget(str(sized[0]), full), group=g,
                          options=options)
            largest = open_package(path)
            for b in sized:
                pkg = largest if b == sized[0] else largest.shrink(b)
                ranked = pkg.rank_batch(vectors, k=50, exclude_indptr=rows.indptr,
                                        exclude_indices=rows.indices)
                for key, value in metrics_from_topk(ranked.items, users, truth,
                                                    (20, 50)).items():
                    per[b].setdefault(key, []).append(value)
    return {b: {k: float(np.concatenate(v).mean()) for k, v in m.items()}
            for b, m in per.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run folder written by peel train")
    ap.add_argument("--split", default="valid", choices=("valid", "test"))
    ap.add_argument("--budgets", default="0.107,0.213,0.533",
                    help="fractions of the full item table")
    args = ap.parse_args()
    cfg = load_run_config(args.run)
    data = load_data(cfg)
    budgets = sorted(float(b) for b in args.budgets.split(","))
    similarity = cfg.deploy.similarity or cfg.finetune.similarity
    print(f"{args.run} ({data.name}), {args.split} split, budgets {budgets}; "
          f"Recall@20 and NDCG@50 per budget")
    print("| selection | weighting | scale | " + " | ".join(
        f"R@20 {b:g}" for b in budgets) + " | " + " | ".join(
        f"N@50 {b:g}" for b in budgets) + " | seconds |")
    print("|" + "---|" * (4 + 2 * len(budgets)))
    for selection, weighting, scale in itertools.product(SELECTIONS, WEIGHTINGS, SCALES):
        if selection == "random" and weighting == "alpha":
            continue  # random order ignores alpha; weighting by it is not a meaningful pair
        t0 = time.perf_counter()
        options = DeployOptions(similarity=similarity, weighting=weighting, scale=scale,
                                selection=selection, seed=cfg.run.seed)
        res = evaluate_variant(args.run, options, budgets, args.split, data, cfg)
        cells = [f"{res[b]['recall@20']:.4f}" for b in budgets]
        cells += [f"{res[b]['ndcg@50']:.4f}" for b in budgets]
        print(f"| {selection} | {weighting} | {scale} | " + " | ".join(cells)
              + f" | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
