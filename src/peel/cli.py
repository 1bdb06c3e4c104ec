"""The ``peel`` command line. Each subcommand is a thin shell over one stage's public API.

Errors a user can fix (bad input, bad option, missing file) end with a one-line message and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from peel import __version__
from peel.config import read_toml, section
from peel.data import DataConfig, DataError, InteractionData, load_dataset
from peel.io import to_json, write_json, write_run_metadata

log = logging.getLogger("peel")


class UsageError(Exception):
    """An error the user can fix; printed without a traceback."""


# ---------------------------------------------------------------------------------------------
# Data options shared by every command that reads interactions
# ---------------------------------------------------------------------------------------------


def add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--format", dest="fmt", default=None,
                   choices=["auto", "lightgcn", "delimited", "parquet"])
    g.add_argument("--delimiter", default=None, help="default: sniffed")
    g.add_argument("--columns", default=None,
                   help="comma-separated roles, e.g. user,item,rating,timestamp (skip to ignore)")
    g.add_argument("--rating-threshold", type=float, default=None,
                   help="keep rows with rating >= this (implicit feedback)")
    g.add_argument("--min-user", type=int, default=None, help="k-core: min interactions/user")
    g.add_argument("--min-item", type=int, default=None, help="k-core: min interactions/item")
    g.add_argument("--split", default=None, choices=["auto", "files", "random"])
    g.add_argument("--cache-dir", default=None, help="dataset cache (default ~/.cache/peel)")
    g.add_argument("--no-cache", action="store_true")


def data_config(args: argparse.Namespace, base: DataConfig | None = None) -> DataConfig:
    cfg = base or DataConfig()
    overrides = {
        "fmt": args.fmt,
        "delimiter": args.delimiter,
        "columns": tuple(args.columns.split(",")) if args.columns else None,
        "rating_threshold": args.rating_threshold,
        "min_user_interactions": args.min_user,
        "min_item_interactions": args.min_item,
        "split": args.split,
    }
    if getattr(args, "seed", None) is not None:
        overrides["seed"] = args.seed
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def resolve_data(spec: str, cfg: DataConfig, args: argparse.Namespace) -> InteractionData:
    """``demo`` / ``demo:SEED`` is the built-in synthetic data; anything else is a path."""
    if spec == "demo" or spec.startswith("demo:"):
        from peel.synthetic import SyntheticConfig, make_demo

        seed = int(spec.split(":", 1)[1]) if ":" in spec else 0
        return make_demo(SyntheticConfig(seed=seed), cfg)
    cache: Any = False if args.no_cache else args.cache_dir
    return load_dataset(spec, cfg, cache_dir=cache)


# ---------------------------------------------------------------------------------------------
# peel data stats
# ---------------------------------------------------------------------------------------------


def cmd_data_stats(args: argparse.Namespace) -> int:
    data = resolve_data(args.path, data_config(args), args)
    stats = data.stats()
    if args.json:
        print(to_json(stats))
        return 0
    width = max(len(k) for k in stats)
    for key, value in stats.items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "none"
        print(f"{key:<{width}}  {value}")
    return 0


# ---------------------------------------------------------------------------------------------
# peel pretrain
# ---------------------------------------------------------------------------------------------


def add_pretrain_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pretraining")
    g.add_argument("--dim", type=int, default=None, help="full embedding size D = N*d")
    g.add_argument("--block-dim", type=int, default=None, help="block size d")
    g.add_argument("--layers", type=int, default=None, help="LightGCN layers (0 = BPR-MF)")
    g.add_argument("--combination", default=None, choices=["mean", "last"])
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--negatives", type=int, default=None)
    g.add_argument("--sampling", default=None, choices=["uniform", "dns"],
                   help="negative sampling: uniform, or hardest of --dns-candidates draws")
    g.add_argument("--dns-candidates", type=int, default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--l2", type=float, default=None)
    g.add_argument("--diversity", type=float, default=None, help="lambda of Eq. 2")
    g.add_argument("--diversity-mode", default=None, choices=["normalized", "literal"])
    g.add_argument("--patience", type=int, default=None)
    g.add_argument("--eval-every", type=int, default=None)
    g.add_argument("--device", default=None, help="auto | cpu | cuda")


def pretrain_config(args: argparse.Namespace, base: Any) -> Any:
    overrides = {
        "dim": args.dim, "block_dim": args.block_dim, "layers": args.layers,
        "layer_combination": args.combination, "epochs": args.epochs,
        "batch_size": args.batch_size, "negatives": args.negatives, "lr": args.lr,
        "sampling": args.sampling, "dns_candidates": args.dns_candidates,
        "l2": args.l2, "diversity": args.diversity, "diversity_mode": args.diversity_mode,
        "patience": args.patience, "eval_every": args.eval_every, "device": args.device,
        "seed": args.seed,
    }
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def load_config_sections(path: str | None) -> dict[str, Any]:
    return read_toml(path) if path else {}


def cmd_pretrain(args: argparse.Namespace) -> int:
    from peel.eval import dot_scorer, evaluate
    from peel.pretrain import PretrainConfig, pretrain, save_result

    doc = load_config_sections(args.config)
    where = args.config or "config"
    dcfg = data_config(args, section(doc, "data", DataConfig, where))
    pcfg = pretrain_config(args, section(doc, "pretrain", PretrainConfig, where))
    pcfg.validate()
    out = Path(args.out)
    data = resolve_data(args.data, dcfg, args)
    write_run_metadata(out, "pretrain", {"data": dcfg, "pretrain": pcfg,
                                         "data_source": args.data}, pcfg.seed)
    t0 = time.perf_counter()
    result = pretrain(data, pcfg, out_dir=out / "checkpoint", progress=not args.quiet)
    seconds = time.perf_counter() - t0
    scorer = dot_scorer(result.user_emb, result.item_emb)
    valid = evaluate(scorer, data, "valid").metrics if data.valid.nnz else {}
    test = evaluate(scorer, data, "test").metrics if data.test.nnz else {}
    save_result(result, out, test)
    summary = {"best_epoch": result.best_epoch, "seconds": seconds, "valid": valid,
               "test": test, "out": str(out)}
    write_json(out / "pretrain_summary.json", summary)
    if args.json:
        print(to_json(summary))
    else:
        print(f"pretrained {data.name}: best epoch {result.best_epoch}, {seconds:.1f}s")
        print(metrics_table({"valid": valid, "test": test}))
    return 0


def metrics_table(rows: dict[str, dict[str, float]]) -> str:
    keys = ["recall@20", "ndcg@20", "recall@50", "ndcg@50"]
    head = f"{'':<10}" + "".join(f"{k:>11}" for k in keys)
    lines = [head]
    for name, metrics in rows.items():
        if metrics:
            lines.append(f"{name:<10}" + "".join(f"{metrics.get(k, float('nan')):>11.4f}"
                                                for k in keys))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# peel demo
# ---------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from peel.eval import dot_scorer, evaluate
    from peel.pretrain import PretrainConfig, pretrain, save_result
    from peel.synthetic import SyntheticConfig, make_demo

    out = Path(args.out)
    scfg = SyntheticConfig(seed=args.seed)
    data = make_demo(scfg)
    pcfg = PretrainConfig(dim=128, layers=3, epochs=60, batch_size=4096, lr=5e-3,
                          diversity=0.1, seed=args.seed, patience=5)
    write_run_metadata(out, "demo", {"synthetic": scfg, "pretrain": pcfg}, args.seed)
    print(f"demo data: {json.dumps({k: v for k, v in data.stats().items() if k != 'dropped'})}")
    result = pretrain(data, pcfg, out_dir=out / "checkpoint", progress=not args.quiet)
    test = evaluate(dot_scorer(result.user_emb, result.item_emb), data, "test").metrics
    save_result(result, out, test)
    print(metrics_table({"LightGCN": test}))
    return 0


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peel", description=(
        "Personalized Elastic Embedding Learning: on-device recommendation under memory budgets"))
    parser.add_argument("--version", action="version", version=f"peel {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="inspect interaction data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    stats = data_sub.add_parser("stats", help="users, items, density, splits, popularity skew")
    stats.add_argument("path", help="dataset folder/file, or 'demo'")
    stats.add_argument("--json", action="store_true")
    stats.add_argument("--seed", type=int, default=None)
    add_data_options(stats)
    stats.set_defaults(func=cmd_data_stats)

    pre = sub.add_parser("pretrain", help="stage 1: LightGCN + diversity regularizer")
    pre.add_argument("data", help="dataset folder/file, or 'demo'")
    pre.add_argument("--out", required=True, help="run folder")
    pre.add_argument("--config", default=None, help="TOML file ([data], [pretrain])")
    pre.add_argument("--seed", type=int, default=None)
    pre.add_argument("--json", action="store_true")
    pre.add_argument("--quiet", action="store_true", help="no progress bar")
    add_data_options(pre)
    add_pretrain_options(pre)
    pre.set_defaults(func=cmd_pretrain)

    demo = sub.add_parser("demo", help="the whole method on built-in synthetic data")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=cmd_demo)

    _register_optional(sub)
    return parser


def _register_optional(sub: Any) -> None:
    """Subcommands of stages that live in their own modules."""
    try:
        from peel import cli_device
    except ImportError:  # pragma: no cover - stage not installed
        return
    cli_device.register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (UsageError, DataError, ValueError, FileNotFoundError, KeyError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"peel: error: {msg}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `peel data stats X | head`
        return 0
    except KeyboardInterrupt:
        print("peel: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main"]
