"""Compare pretraining variants on validation data: layer combination and the diversity term.

Each variant is trained with early stopping on validation Recall@20; the table shows validation
Recall@20 (what decides defaults), the mean pairwise block distance of the item table
(normalised blocks, Eq. 2's quantity), the best epoch and the seconds taken. The script is
used for decisions, so it reads no test split unless ``--report-test`` asks for it, after a
decision is made; ``--json`` also keeps each variant's per-epoch validation curve.

    python benchmarks/pretrain_variants.py --data ../shared/datasets/lastfm \
        --variants combination=mean combination=last diversity=0 diversity=0.1 ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from peel.data import load_dataset
from peel.eval import dot_scorer, evaluate
from peel.overrides import override_fields
from peel.pretrain import PretrainConfig, mean_block_distance, pretrain

#: short names accepted in variants; any PretrainConfig field name works as well
FIELDS = {"combination": "layer_combination", "mode": "diversity_mode", "batch": "batch_size",
          "dns": "dns_candidates", "halflife": "lr_half_life"}


def apply_variant(base: PretrainConfig, text: str) -> PretrainConfig:
    """``key=value,key=value`` through peel's one strict override parser."""
    pairs = []
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        pairs.append(f"{FIELDS.get(key, key)}{sep}{value}")
    return override_fields(base, pairs, where="pretrain")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--variants", nargs="+", required=True,
                    help="comma-separated key=value overrides of PretrainConfig fields (short "
                         "names: " + ", ".join(FIELDS) + ")")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--json", default=None)
    ap.add_argument("--report-test", action="store_true",
                    help="add test Recall@20 / NDCG@20 columns (reporting only)")
    args = ap.parse_args(argv)
    data = load_dataset(args.data)
    base = PretrainConfig(dim=args.dim, epochs=args.epochs, patience=args.patience,
                          seed=args.seed)
    print(f"# {data.name}: base config {base}")
    test_head = f" {'test_R@20':>9} {'test_N@20':>9}" if args.report_test else ""
    print(f"{'variant':<40} {'val_R@20':>9}{test_head} {'block_dist':>10} {'epoch':>5} {'sec':>6}")
    rows = []
    for text in args.variants:
        cfg = apply_variant(base, text)
        t0 = time.perf_counter()
        res = pretrain(data, cfg, progress=False)
        sec = time.perf_counter() - t0
        dist = mean_block_distance(res.item_emb, cfg.block_dim)
        row = {"variant": text, "valid_recall@20": res.valid_metrics.get("recall@20"),
               "block_distance": dist, "best_epoch": res.best_epoch, "seconds": sec,
               "valid_curve": [[rec["epoch"], rec["valid"].get("recall@20")]
                               for rec in res.history if rec.get("valid")]}
        test_cols = ""
        if args.report_test:
            row["test"] = evaluate(dot_scorer(res.user_emb, res.item_emb), data, "test").metrics
            test_cols = f" {row['test']['recall@20']:9.4f} {row['test']['ndcg@20']:9.4f}"
        rows.append(row)
        print(f"{text:<40} {row['valid_recall@20']:9.4f}{test_cols} {dist:10.4f}"
              f" {res.best_epoch:5d} {sec:6.0f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
