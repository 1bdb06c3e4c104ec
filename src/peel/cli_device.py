"""``peel deploy``, ``peel recommend`` and ``peel shrink``: the package commands.

:func:`register` adds them to an argparse subparsers object; each sets ``func`` to a handler
that takes the parsed namespace and returns the exit status (0, or 2 after printing a one-line
error to stderr). Errors a user can cause (bad budget, missing file, corrupt package, unknown
user) never end in a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from peel.budget import SCALES, SELECTIONS, SIMILARITIES, WEIGHTINGS
from peel.device import Package, Ranking, open_package
from peel.io import to_json
from peel.package import (
    DEFAULT_PRECISION,
    DEFAULT_SCALE,
    DEFAULT_SIMILARITY,
    DEFAULT_WEIGHTING,
    PRECISION_CHOICES,
)

Handler = Callable[[argparse.Namespace], int]


def register(subparsers: Any) -> None:
    """Add deploy, recommend and shrink to ``subparsers`` (from ``add_subparsers``)."""
    _add_deploy(subparsers)
    _add_recommend(subparsers)
    _add_shrink(subparsers)


def _add_deploy(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "deploy", help="write the package of a user group (or one user) for a memory budget",
        description="Select item blocks for a memory budget and write a device package.")
    p.add_argument("run", help="run folder holding groups/group_NNN.npz")
    p.add_argument("--budget", required=True,
                   help="bytes (5000000), a size (5MB, 10MiB, 512KB) or a fraction of the full "
                        "item table (0.25 or 25%%)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--group", type=int, help="user group: the package serves all its users")
    who.add_argument("--user", type=int,
                     help="user index: the package stores this user's embedding")
    p.add_argument("--out", required=True, help="package file to write (atomically)")
    p.add_argument("--similarity", choices=SIMILARITIES, default=None,
                   help="Eq. 10 reading stored in the package (default: the run's [deploy] "
                        f"setting, else training's, else {DEFAULT_SIMILARITY})")
    p.add_argument("--weighting", choices=WEIGHTINGS, default=None,
                   help="scale kept blocks by their weight (default: the run's, else "
                        f"{DEFAULT_WEIGHTING})")
    p.add_argument("--scale", choices=SCALES, default=None,
                   help="multiply item group g's scores by Eq. 10's max_k |S_k| / |S_g| (eq10) "
                        f"or not (none); default: the run's, else {DEFAULT_SCALE}")
    p.add_argument("--selection", choices=SELECTIONS, default=None,
                   help="block order: by importance weight (the paper) or random (ablation); "
                        "default: the run's")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of --selection random (default: the run's seed)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default=None,
                   help="how kept blocks are stored: fp32 (format v3, as before), fp16, int8 / "
                        "int8o (per-row float16 scale / and offset), int4 (4-bit, per-row "
                        "scale; format v5), int8s / int4s (one scale per item shared by its "
                        "blocks; format v6), int4rP (4-bit blocks, then 4-bit refinements "
                        "ranked at P%% of their block's weight; format v7), value (per block, best "
                        "value per byte); auto = the rule the run chose on its validation split "
                        f"(RUN/precision.json), else {DEFAULT_PRECISION}; default: the run's "
                        "[deploy] precision")
    p.add_argument("--partial", action="store_true",
                   help="allow a run whose fine-tuning did not finish")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_guard("deploy", deploy))


def _add_recommend(subparsers: Any) -> None:
    p = subparsers.add_parser("recommend", help="rank items for the user stored in a package",
                              description="Top-K items for the package's user (Eq. 10).")
    p.add_argument("package", help="package file written by peel deploy --user")
    p.add_argument("--k", type=int, default=50, help="number of items (default 50)")
    p.add_argument("--budget", default=None, help="shrink to this budget first (in memory)")
    p.add_argument("--exclude", default="",
                   help="comma-separated item indices to leave out, e.g. 1,2,3")
    p.add_argument("--similarity", choices=SIMILARITIES, default=None,
                   help="override the package's Eq. 10 reading")
    p.add_argument("--weighting", choices=WEIGHTINGS, default=None,
                   help="override the package's block weighting")
    p.add_argument("--scale", choices=SCALES, default=None,
                   help="override the package's Eq. 10 factor (eq10 or none)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_guard("recommend", recommend))


def _add_shrink(subparsers: Any) -> None:
    p = subparsers.add_parser("shrink", help="write a package cut down to a smaller budget",
                              description="Drop the least important blocks to fit a budget.")
    p.add_argument("package", help="package file to shrink")
    p.add_argument("--budget", required=True, help="the new, smaller budget")
    p.add_argument("--out", required=True, help="package file to write (atomically)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_guard("shrink", shrink))


def _guard(command: str, handler: Handler) -> Handler:
    """Turn expected failures into one clean line on stderr and exit status 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (ValueError, OSError) as err:
            print(f"peel {command}: error: {err}", file=sys.stderr)
            return 2

    run.__doc__ = handler.__doc__
    return run


def deploy(args: argparse.Namespace) -> int:
    """Build one package from a run folder, with the run's own deploy settings."""
    from peel.pipeline import deploy_package

    overrides = {"similarity": args.similarity, "weighting": args.weighting,
                 "scale": args.scale, "selection": args.selection, "seed": args.seed,
                 "precision": args.precision}
    group, report = deploy_package(args.run, args.budget, args.out, user=args.user,
                                   group=args.group, partial=args.partial, **overrides)
    pkg = open_package(args.out)
    if args.json:
        print(to_json({"out": str(args.out), **pkg.describe()}))
    else:
        who = f"user {args.user} (group {group})" if args.user is not None else f"group {group}"
        kinds = ", ".join(f"{n} {k}" for k, n in pkg.kind_counts().items() if n)
        print(f"wrote {args.out}: {who}, {report.n_selected} of {report.n_candidates} blocks "
              f"({kinds}; precision {pkg.precision}), {pkg.similarity} similarity, weighting "
              f"{pkg.weighting}, scale {pkg.scale}")
        print(report.table())
    return 0


def _parse_exclude(text: str) -> np.ndarray:
    try:
        return np.asarray([int(tok) for tok in text.split(",") if tok.strip()], dtype=np.int64)
    except (ValueError, OverflowError) as err:  # OverflowError: an index beyond 64 bits
        raise ValueError(f"--exclude {text[:80]!r}: expected comma-separated item indices of "
                         f"this package, e.g. 1,2,3") from err


def recommend(args: argparse.Namespace) -> int:
    """Rank the stored user's items, optionally after shrinking."""
    pkg: Package = open_package(args.package)
    if args.budget is not None:
        pkg = pkg.shrink(args.budget)
    ranking = pkg.rank(k=args.k, exclude=_parse_exclude(args.exclude),
                       similarity=args.similarity, weighting=args.weighting, scale=args.scale)
    if args.json:
        print(to_json({"package": str(args.package), "user": pkg.spec.user,
                       "budget": pkg.budget, "n_selected": pkg.n_selected,
                       "items": ranking.items, "scores": ranking.scores,
                       "ids": ranking.ids}))
    else:
        _print_ranking(pkg, ranking)
    return 0


def _print_ranking(pkg: Package, ranking: Ranking) -> None:
    print(f"user {pkg.spec.user}: top {ranking.items.size} of {pkg.n_items:,} items, "
          f"{pkg.n_selected} blocks, budget {pkg.budget:,} B")
    has_ids = ranking.ids is not None
    print(f"{'rank':>5} {'item':>9}" + (f" {'id':>12}" if has_ids else "") + f" {'score':>12}")
    for r, (item, score) in enumerate(zip(ranking.items, ranking.scores, strict=True), 1):
        ident = f" {int(ranking.ids[r - 1]):>12}" if has_ids else ""
        print(f"{r:>5} {int(item):>9}{ident} {float(score):>12.5f}")


def shrink(args: argparse.Namespace) -> int:
    """Write a shrunk copy of a package."""
    small = open_package(args.package).shrink(args.budget)
    small.save(args.out)
    if args.json:
        print(to_json({"out": str(args.out), **small.describe()}))
    else:
        print(f"wrote {args.out}: {small.n_selected} of {small.report.n_candidates} blocks kept")
        print(small.report.table())
    return 0
