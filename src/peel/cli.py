"""The ``peel`` command line. Each subcommand is a thin shell over one stage's public API.

Errors a user can fix (bad input, bad option, missing file) end with a one-line message and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

from peel import __version__
from peel.budget import SCALES
from peel.config import read_toml, section
from peel.data import DataConfig, DataError, InteractionData
from peel.errors import TaskError
from peel.io import to_json

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
    """``demo`` / ``demo:SEED`` or a path, with the command's cache options."""
    from peel.pipeline import resolve_data as resolve

    return resolve(spec, cfg, cache_dir=False if args.no_cache else args.cache_dir)


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
    g.add_argument("--lr-half-life", type=int, default=None,
                   help="learning-rate half-life in optimiser steps (0 = constant)")
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
        "lr_half_life": args.lr_half_life,
        "sampling": args.sampling, "dns_candidates": args.dns_candidates,
        "l2": args.l2, "diversity": args.diversity, "diversity_mode": args.diversity_mode,
        "patience": args.patience, "eval_every": args.eval_every, "device": args.device,
        "seed": args.seed,
    }
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def load_config_sections(path: str | None) -> dict[str, Any]:
    return read_toml(path) if path else {}


def cmd_pretrain(args: argparse.Namespace) -> int:
    from peel.pipeline import pretrain_only
    from peel.pretrain import PretrainConfig

    doc = load_config_sections(args.config)
    where = args.config or "config"
    dcfg = data_config(args, section(doc, "data", DataConfig, where))
    pcfg = pretrain_config(args, section(doc, "pretrain", PretrainConfig, where))
    summary = pretrain_only(args.data, dcfg, pcfg, args.out,
                            cache_dir=False if args.no_cache else args.cache_dir,
                            progress=not args.quiet)
    if args.json:
        print(to_json(summary))
    else:
        print(f"pretrained {summary['dataset']}: best epoch {summary['best_epoch']}, "
              f"{summary['seconds']:.1f}s")
        print(metrics_table({"valid": summary["valid"], "test": summary["test"]}))
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
# peel train / evaluate / report / demo
# ---------------------------------------------------------------------------------------------


def _run_config(args: argparse.Namespace) -> Any:
    from peel.overrides import apply_overrides
    from peel.pipeline import load_config

    cfg = load_config(args.config)
    cfg = apply_overrides(cfg, args.set or [])
    if args.data is not None:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, data=args.data))
    if args.label is not None:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, label=args.label))
    if args.workers is not None:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, workers=args.workers))
    if args.seed is not None:
        cfg = cfg.with_seed(args.seed)
    cfg.validate()
    return cfg


def add_executor_options(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("executor")
    g.add_argument("--executor", default="local", choices=["local", "ray"],
                   help=f"where {what} run: local processes, or Ray tasks "
                        "(pip install 'peel-rec[ray]')")
    g.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                   help="join a running Ray cluster (default: start a local Ray with "
                        "--workers CPUs, all cores if not given)")


def _executor(args: argparse.Namespace, workers: int | None, threads: int, desc: str
              ) -> Any:
    """The executor the flags ask for (a context manager), or None for the command's own
    default: ``run.workers`` local processes for groups, one baseline after another here."""
    from peel.executor import make_executor

    default = desc == "groups" or workers is None
    if args.executor == "local" and args.ray_address is None and default:
        return None
    return make_executor(workers, progress=not args.quiet, backend=args.executor,
                         address=args.ray_address, threads_per_worker=threads, desc=desc)


def cmd_train(args: argparse.Namespace) -> int:
    import contextlib

    from peel.pipeline import train

    cfg = _run_config(args)
    executor = _executor(args, cfg.run.workers, cfg.finetune.threads, "groups")
    if args.reuse_pretrain:
        from peel.pipeline import reuse_pretrain

        reuse_pretrain(args.reuse_pretrain, args.out, cfg)
    with executor if executor is not None else contextlib.nullcontext():
        summary = train(cfg, args.out, progress=not args.quiet, executor=executor)
    if args.json:
        print(to_json({"seconds": summary["seconds"], "out": args.out,
                       "user_group_sizes": summary["user_group_sizes"]}))
    else:
        secs = ", ".join(f"{k} {v:.1f}s" for k, v in summary["seconds"].items())
        print(f"trained {args.out}: {secs}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import contextlib

    from peel.pipeline import evaluate

    if args.merge is not None:
        from peel.pipeline import merge_eval_rows

        rows = merge_eval_rows(args.run, args.merge)
        print(rows_table(rows))
        return 0
    budgets = args.budgets.split(",") if args.budgets else None
    if args.tune_trials and args.baselines is None:
        raise UsageError("--tune-trials tunes the baselines: add --baselines (e.g. "
                         "--baselines pmf,bpr-mf,lightgcn)")
    selections = args.selection.split(",") if args.selection else []
    baselines = _baselines_arg(args.baselines)
    precisions = _precisions_arg(args.precision)
    executor = _executor(args, args.workers, 1, "baselines") if baselines else None
    with executor if executor is not None else contextlib.nullcontext():
        rows = evaluate(args.run, budgets, baselines=baselines,
                        selections=selections, scales=[args.scale] if args.scale else [],
                        progress=not args.quiet, split=args.split, partial=args.partial,
                        tune_trials=args.tune_trials, reference=args.reference,
                        executor=executor, precisions=precisions,
                        peel=not args.baselines_only)
    if args.json:
        print(to_json([dataclasses.asdict(r) for r in rows]))
    else:
        print(rows_table(rows))
    return 0


def _precisions_arg(value: str | None) -> list[str]:
    """``--precision fp32,int8`` -> ["fp32", "int8"], each checked (a one-line error if not)."""
    from peel.package import PRECISION_CHOICES

    names = [n.strip() for n in (value or "").split(",") if n.strip()]
    bad = [n for n in names if n not in PRECISION_CHOICES]
    if bad:
        raise ValueError(f"--precision: unknown rule(s) {', '.join(map(repr, bad))}; expected "
                         f"any of {', '.join(PRECISION_CHOICES)}")
    return names


def _baselines_arg(value: str | None) -> bool | list[str]:
    """``--baselines`` alone: the run's [deploy] baselines; ``--baselines a,b``: those."""
    if value is None:
        return False
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        return True
    from peel.baselines import check_names

    check_names(names, "--baselines")
    return names


def rows_table(rows: list[Any]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r.metrics)) or [
        "recall@20", "ndcg@20", "recall@50", "ndcg@50"]
    lines = [f"{'method':<28}{'budget':>8}{'MB':>8}" + "".join(f"{k:>11}" for k in keys)]
    for r in rows:
        lines.append(f"{r.method:<28}{r.budget:>8}{r.budget_bytes / 1e6:>8.2f}"
                     + "".join(f"{r.metrics.get(k, float('nan')):>11.4f}" for k in keys))
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> int:
    from peel.report import write_report

    info = write_report(args.runs, args.out, partial=args.partial)
    if args.json:
        print(to_json(info))
    else:
        print((Path(args.out) / "results.md").read_text())
        print(f"wrote {args.out}/results.md, results.csv, results.json"
              + (", " + ", ".join(f"{p.replace('@', '')}.png" for p in info["plots"])
                 if info["plots"] else ""))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from peel.pipeline import demo_config, evaluate, train

    cfg = demo_config(args.seed)
    out = Path(args.out)
    t0 = time.perf_counter()
    train(cfg, out, progress=not args.quiet)
    rows = evaluate(out, baselines=True, selections=["random"], progress=not args.quiet)
    print(rows_table(rows))
    print(f"demo finished in {time.perf_counter() - t0:.0f}s; run folder: {out}")
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

    tr = sub.add_parser("train", help="all server stages: pretrain, groups, fine-tuning")
    tr.add_argument("data", nargs="?", default=None, help="dataset folder/file, or 'demo'")
    tr.add_argument("--out", required=True, help="run folder (re-run to resume)")
    tr.add_argument("--config", default=None, help="TOML file with every hyper-parameter")
    tr.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                    help="override one config value, e.g. groups.item_grouping=random")
    tr.add_argument("--label", default=None, help="method name in reports")
    tr.add_argument("--reuse-pretrain", default=None, metavar="RUN",
                    help="copy stage 1 from RUN (same data and [pretrain] settings required)")
    tr.add_argument("--workers", type=int, default=None, help="parallel group workers")
    tr.add_argument("--seed", type=int, default=None)
    tr.add_argument("--json", action="store_true")
    tr.add_argument("--quiet", action="store_true")
    add_executor_options(tr, "the user groups' fine-tuning tasks")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="deploy every group at every budget, rank on device")
    ev.add_argument("run")
    ev.add_argument("--budgets", default=None, help="e.g. 5MB,10MB,0.5 (default: config)")
    ev.add_argument("--baselines", nargs="?", const="", default=None, metavar="NAMES",
                    help="also evaluate baselines per budget: the config's list, or a comma "
                         "list such as pmf,bpr-mf,lightgcn,lightgcn-svd")
    ev.add_argument("--tune-trials", type=int, default=0, metavar="N",
                    help="tune each baseline at each budget on the validation split with N "
                         "trials (the configured setting + N-1 random draws; 0: no tuning)")
    ev.add_argument("--reference", action="store_true",
                    help="also evaluate PEEL with every block kept and the run's pretrained "
                         "model (budget 'all')")
    ev.add_argument("--selection", default=None,
                    help="extra block selections to evaluate, e.g. random (ablation)")
    ev.add_argument("--scale", default=None, choices=SCALES,
                    help="also evaluate with this Eq. 10 factor setting, e.g. eq10 (the "
                         "paper's max|S_k|/|S_g|)")
    ev.add_argument("--precision", default=None, metavar="RULES",
                    help="also evaluate PEEL with kept blocks stored by these precision rules "
                         "(comma-separated: auto, fp32, fp16, int8, int8o, int4, int8s, int4s, "
                         "value, int4r0, int4r25, int4r50, int4r100; the run's "
                         "own is [deploy] precision, default auto)")
    ev.add_argument("--baselines-only", action="store_true",
                    help="evaluate the baselines alone: needs only the run's data and config, "
                         "not its group files (e.g. tune them on another machine, then merge "
                         "that run's eval.json rows with `peel evaluate --merge`)")
    ev.add_argument("--merge", default=None, metavar="EVAL_JSON",
                    help="evaluate nothing; add the rows of EVAL_JSON (the eval.json of a copy "
                         "of this run, e.g. from --baselines-only elsewhere) to this run's")
    ev.add_argument("--split", default="test", choices=["test", "valid"],
                    help="valid: for choosing settings (nothing is saved)")
    ev.add_argument("--partial", action="store_true",
                    help="allow an incomplete run (rows are marked partial)")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--quiet", action="store_true")
    ev.add_argument("--workers", type=int, default=None,
                    help="baseline tasks at a time: one per method x budget, or with "
                         "--tune-trials one per trial (default: one after another here; with "
                         "--executor ray: the cluster's CPUs)")
    add_executor_options(ev, "the baselines' tasks (one per method x budget)")
    ev.set_defaults(func=cmd_evaluate)

    rep = sub.add_parser("report", help="Table III-style Markdown/CSV/JSON and plots")
    rep.add_argument("runs", nargs="+")
    rep.add_argument("--out", required=True)
    rep.add_argument("--partial", action="store_true",
                     help="allow incomplete runs and partial evaluations")
    rep.add_argument("--json", action="store_true")
    rep.set_defaults(func=cmd_report)

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
    from peel import cli_experiment

    cli_experiment.register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (UsageError, DataError, ValueError, FileNotFoundError, KeyError,
            TaskError) as err:
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
