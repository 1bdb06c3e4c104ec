"""Stage-2 open points, measured: deployed validation Recall@20 of fine-tuning variants.

Pretrains once (cached in OUT/pretrained), fine-tunes every user group once per variant
(``python -m peel.elastic`` with FinetuneConfig overrides), then ranks the validation users with
Eq. 10 on the deployed blocks at several budgets, with both readings of Eq. 10. Prints one row
per variant. Validation data only: the test split is never read here.

    python benchmarks/finetune_variants.py --out /tmp/ftv \
        --variants "" "alpha_scale=literal" "scorer=dot" "hypergradient=first_order"
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from peel.elastic import SIMILARITIES
from peel.elastic import main as elastic_main


def run_variant(args: argparse.Namespace, variant: str, index: int) -> dict:
    sets = [kv for kv in variant.split(",") if kv]
    log = Path(args.out) / "variants.jsonl"
    argv = ["--data", args.data, "--pretrained", str(Path(args.out) / "pretrained"),
            "--out", str(Path(args.out) / f"v{index:02d}"), "--seed", str(args.seed),
            "--workers", str(args.workers), "--budgets", args.budgets, "--log", str(log)]
    argv += ["--set", *args.common, *sets] if (sets or args.common) else []  # variant wins
    argv += ["--groups", *args.groups] if args.groups else []
    argv += ["--pretrain", *args.pretrain] if args.pretrain else []
    print("# python -m peel.elastic " + shlex.join(argv), flush=True)
    return elastic_main(argv)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="demo")
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", nargs="+", default=[""],
                    help="comma-separated FinetuneConfig overrides; '' = defaults")
    ap.add_argument("--common", nargs="*", default=[], help="overrides for every variant")
    ap.add_argument("--groups", nargs="*", default=["n_user_groups=6", "n_item_groups=10"])
    ap.add_argument("--pretrain", nargs="*",
                    default=["epochs=60", "batch_size=4096", "lr=0.005", "patience=5",
                             "diversity=0.1"])
    ap.add_argument("--budgets", default="1.0,0.213,0.107")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows = [(v or "defaults", run_variant(args, v, i)) for i, v in enumerate(args.variants)]
    fracs = [float(b) for b in args.budgets.split(",")]
    cols = [f"R@20 {s} {f:g}" for f in fracs for s in SIMILARITIES]
    print("\n| variant | " + " | ".join(cols) + " | seconds | epochs |")
    print("|---" * (len(cols) + 3) + "|")
    for name, row in rows:
        vals = " | ".join(f"{row[c]:.4f}" for c in cols)
        print(f"| {name} | {vals} | {row['wall_seconds']:.0f} | {row['epochs']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
