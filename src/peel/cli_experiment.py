"""``peel experiment {dynamic,latency,sweep}``: the paper's RQ2, RQ5 and RQ3 as reports.

Thin shells over :mod:`peel.experiments` and :mod:`peel.latency`; each writes a folder with
``report.md``, CSV/JSON and a PNG. Errors a user can fix end in a one-line message (exit 2).
"""

from __future__ import annotations

import argparse
from typing import Any

from peel.io import to_json


def register(subparsers: Any) -> None:
    """Add ``experiment`` with its three subcommands to ``subparsers``."""
    exp = subparsers.add_parser("experiment", help="the paper's RQ2/RQ3/RQ5 as reports")
    sub = exp.add_subparsers(dest="experiment", required=True)
    _add_dynamic(sub)
    _add_latency(sub)
    _add_sweep(sub)


def _common(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("run", help="a trained run folder (peel train)")
    p.add_argument("--out", default=None, help=f"report folder (default: RUN/{default_out})")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--quiet", action="store_true")


def _names(value: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in value.split(",") if n.strip())


def _out(args: argparse.Namespace, default: str) -> str:
    from pathlib import Path

    return args.out or str(Path(args.run) / default)


def _add_dynamic(sub: Any) -> None:
    from peel.experiments import DYNAMIC_BUDGETS

    p = sub.add_parser("dynamic", help="RQ2 / Fig. 3: a device's budget changes over time")
    _common(p, "experiments/dynamic")
    p.add_argument("--budgets", default=",".join(DYNAMIC_BUDGETS),
                   help="the budget sequence, e.g. 0.533,0.213,0.107,0.533")
    p.add_argument("--baselines", default="lightgcn-svd",
                   help="methods to compare (comma list of peel evaluate --baselines names; "
                        "'' for PEEL only)")
    p.add_argument("--split", default="test", choices=["test", "valid"])
    p.add_argument("--metric", default="recall@20",
                   choices=["recall@20", "ndcg@20", "recall@50", "ndcg@50"],
                   help="the accuracy panel of the plot")
    p.add_argument("--shrink-reps", type=int, default=5)
    p.add_argument("--from-eval", action="store_true",
                   help="take a baseline's fits from RUN/eval.json when it holds every budget "
                        "(measured fit seconds and test metrics) instead of fitting again")
    p.set_defaults(func=cmd_dynamic)


def cmd_dynamic(args: argparse.Namespace) -> int:
    from peel.experiments import DynamicConfig, dynamic

    cfg = DynamicConfig(budgets=_names(args.budgets), baselines=_names(args.baselines),
                        split=args.split, shrink_reps=args.shrink_reps, metric=args.metric,
                        from_eval=args.from_eval)
    info = dynamic(args.run, _out(args, "experiments/dynamic"), cfg,
                   progress=not args.quiet, command=_command(args))
    _print(args, info, "report.md")
    return 0


def _add_latency(sub: Any) -> None:
    p = sub.add_parser("latency", help="RQ5 / Table IV: per-user top-50 time on simulated "
                                       "IoT and cellphone devices")
    _common(p, "experiments/latency")
    p.add_argument("--budgets", default=None, help="default: the run's [deploy] budgets")
    p.add_argument("--baselines", default="lightgcn-svd",
                   help="baselines to time (comma list; '' for PEEL only)")
    p.add_argument("--users", type=int, default=200, help="users timed per method and budget")
    p.add_argument("--devices", default="iot,cellphone",
                   help="simulated devices (iot: 1 thread, 64 MB; cellphone: 2 threads, "
                        "512 MB)")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--fit-epochs", type=int, default=None,
                   help="fit the baselines for at most this many epochs (their ranking time "
                        "depends on the budget, not on the training; default: full fits)")
    p.set_defaults(func=cmd_latency)


def cmd_latency(args: argparse.Namespace) -> int:
    from peel.experiments import LatencyConfig, latency

    budgets = _names(args.budgets) if args.budgets else ()
    cfg = LatencyConfig(budgets=budgets, baselines=_names(args.baselines), users=args.users,
                        devices=_names(args.devices), k=args.k, fit_epochs=args.fit_epochs)
    info = latency(args.run, _out(args, "experiments/latency"), cfg, progress=not args.quiet,
                   command=_command(args))
    _print(args, info, "report.md")
    return 0


def _add_sweep(sub: Any) -> None:
    p = sub.add_parser("sweep", help="RQ3 / Fig. 5: one hyper-parameter over a list of values")
    _common(p, "experiments/sweep")
    p.add_argument("--param", required=True, metavar="SECTION.KEY=V1,V2,...",
                   help="e.g. groups.n_item_groups=5,10,15,20,25 (groups.n_user_groups and "
                        "groups.n_item_groups reuse the run's stage 1; finetune.n_blocks "
                        "trains its own)")
    p.add_argument("--budget", default="0.213",
                   help="evaluation budget, a fraction of the base run's full table (kept in "
                        "bytes for every value)")
    p.add_argument("--workers", type=int, default=None,
                   help="group fine-tuning processes (with --executor ray: Ray workers)")
    from peel.cli import add_executor_options

    add_executor_options(p, "every value's group fine-tuning tasks (one Ray for the sweep)")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    import contextlib

    from peel.cli import _executor
    from peel.experiments import SweepConfig, parse_param, sweep
    from peel.pipeline import load_run_config

    key, values = parse_param(args.param)
    cfg = SweepConfig(key=key, values=values, budget=args.budget, workers=args.workers)
    cfg.validate()  # before a Ray is started
    threads = load_run_config(args.run).finetune.threads
    executor = _executor(args, args.workers, threads, "groups")
    with executor if executor is not None else contextlib.nullcontext():
        info = sweep(args.run, _out(args, "experiments/sweep"), cfg, progress=not args.quiet,
                     command=_command(args), executor=executor)
    _print(args, info, "report.md")
    return 0


def _command(args: argparse.Namespace) -> str:
    """The command as parsed (every option spelled out), so the report names exactly what
    ran, whether it came from the shell or from ``peel.cli.main([...])``."""
    import shlex

    parts = ["peel", "experiment", args.experiment, args.run]
    for key, value in vars(args).items():
        if key in ("command", "experiment", "run", "func", "json", "quiet", "verbose") \
                or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def _print(args: argparse.Namespace, info: dict[str, Any], name: str) -> None:
    from pathlib import Path

    if args.json:
        print(to_json(info["rows"]))
    else:
        print((Path(info["out"]) / name).read_text())
        print(f"wrote {info['out']}")
