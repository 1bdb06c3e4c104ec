"""Pretraining speed/quality on gowalla: seconds per epoch and VALIDATION Recall@20 vs wall-clock.

Trains on train.txt and evaluates valid.txt at every evaluation. This benchmark chooses stage
1's recipe (sampling, learning rate, schedule), so it never reads the test split: an earlier
version printed test Recall@20 per epoch and the recipe was picked from it (issue 13). The
trace keeps, per evaluation, validation Recall@20 / NDCG@20, the loss and the wall-clock
(training plus validation, from the start of training).

    python benchmarks/pretrain_gowalla.py --dim 64 --minutes 60 --json trace.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from peel.data import load_dataset
from peel.pretrain import PretrainConfig, pretrain


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2]
                                          / "shared" / "datasets" / "gowalla"))
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    ap.add_argument("--negatives", type=int, default=PretrainConfig.negatives)
    ap.add_argument("--sampling", default=PretrainConfig.sampling)
    ap.add_argument("--dns-candidates", type=int, default=PretrainConfig.dns_candidates)
    ap.add_argument("--lr", type=float, default=PretrainConfig.lr)
    ap.add_argument("--lr-half-life", type=int, default=PretrainConfig.lr_half_life,
                    help="optimiser steps; 0 = constant learning rate")
    ap.add_argument("--l2", type=float, default=PretrainConfig.l2)
    ap.add_argument("--diversity", type=float, default=0.0)
    ap.add_argument("--combination", default=PretrainConfig.layer_combination)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=1)
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--json", type=str, default=None, help="write the trace to this file")
    args = ap.parse_args(argv)

    data = load_dataset(args.data)
    cfg = PretrainConfig(dim=args.dim, layers=args.layers, batch_size=args.batch_size,
                         negatives=args.negatives, sampling=args.sampling,
                         dns_candidates=args.dns_candidates, lr=args.lr,
                         lr_half_life=args.lr_half_life,
                         l2=args.l2, diversity=args.diversity,
                         layer_combination=args.combination, epochs=args.epochs,
                         eval_every=args.eval_every, max_minutes=args.minutes, seed=args.seed,
                         patience=10**9)
    print(f"# gowalla pretrain bench: {json.dumps(vars(args))}")
    print(f"# torch threads={torch.get_num_threads()}  users={data.n_users} items={data.n_items}"
          f" train={data.train.nnz}")
    print(f"{'epoch':>5} {'s/epoch':>8} {'wall_min':>8} {'loss':>8} {'val_R@20':>9}"
          f" {'val_N@20':>9}")
    trace = []

    def on_eval(rec: dict, emb: tuple | None) -> None:
        if "valid" not in rec:  # an epoch without an evaluation
            return
        valid = rec["valid"]
        trace.append({"epoch": rec["epoch"], "sec_per_epoch": rec["seconds"],
                      "wall_min": rec["elapsed"] / 60, "loss": rec["loss"],
                      "val_recall@20": valid["recall@20"],
                      "val_ndcg@20": valid.get("ndcg@20")})
        print(f"{rec['epoch']:5d} {rec['seconds']:8.1f} {rec['elapsed'] / 60:8.2f}"
              f" {rec['loss']:8.4f} {valid['recall@20']:9.4f}"
              f" {valid.get('ndcg@20', float('nan')):9.4f}", flush=True)

    result = pretrain(data, cfg, progress=False, on_eval=on_eval)
    best = max(trace, key=lambda t: t["val_recall@20"]) if trace else {}
    print(f"# best epoch {result.best_epoch} by validation Recall@20:"
          f" {best.get('val_recall@20', float('nan')):.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "trace": trace,
                                               "best_epoch": result.best_epoch}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
