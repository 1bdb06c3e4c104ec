"""Which precision rule ``precision="auto"`` stands for in one run: chosen on its validation split.

Why per run. The measured rules trade datasets against each other (docs/paper-notes.md,
"4-bit refinements"): where accuracy still grows with every block a package can hold (gowalla
at 10.7% of the table), 4-bit blocks before any refinement (``int4r0``) win; where every block
that matters already fits and rounding is what is left (ml-1m), refinements placed early
(``int4r25``) or int8 blocks win. One fixed rule pays a regret on one of them. A run can see
which case it is in on its own validation users, like every other choice peel makes.

Why one rule for every budget of the run: a package is a prefix of the order its rule gives,
and shrinking on the device cuts that prefix. A rule chosen per budget would make a shrunk
package differ from a fresh one; one rule per run keeps shrink == deploy.

The decision (fixed before any figure was read, the same rule as
``benchmarks/precision_rules.py``): the candidate with the highest validation Recall@20
averaged over the run's ``[deploy] budgets``; a candidate within :data:`TIE` of the best counts
as tied and the earlier one in ``[deploy] precision_candidates`` wins (the first is the fixed
default, so a run only moves away from it for a real difference).

Written to RUN/precision.json (:data:`peel.runfolder.PRECISION_FILE`) with every candidate's
figures, the group files it was measured on (their hashes: re-trained groups choose again)
and the seconds it took; :func:`peel.pipeline.deploy_options` reads it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peel import runfolder
from peel.io import file_digest, read_json, write_json

#: Two candidates whose mean validation Recall@20 differ by less than this are tied.
TIE = 5e-4
#: What the decision compares.
METRIC = "recall@20"


def choose(means: Mapping[str, float], candidates: Sequence[str], tie: float = TIE) -> str:
    """The first candidate (in ``candidates`` order) within ``tie`` of the best mean."""
    if not candidates:
        raise ValueError("choose: no candidate rules")
    best = max(means[c] for c in candidates)
    return next(c for c in candidates if means[c] >= best - tie)


def groups_digest(run: str | Path) -> dict[str, str]:
    """Hash of every user group's arrays: the choice is only valid for these groups."""
    return {str(g): file_digest(path) for g, path in runfolder.group_files(run)}


def score_candidates(run: str | Path, data: Any, cfg: Any, candidates: Sequence[str],
                     budgets: Sequence[str],
                     per_user_out: dict[str, dict[str, dict[str, np.ndarray]]] | None = None,
                     progress: bool = False) -> tuple[dict[str, dict[str, dict]], dict]:
    """Every candidate's VALIDATION metrics per budget (and seconds per candidate), built and
    ranked by the real package writer and device runtime (:func:`peel.pipeline.evaluate_peel`).

    ``per_user_out``, when given, receives rule -> budget -> per-user metrics and ``users``.
    """
    from peel.pipeline import evaluate_peel

    results: dict[str, dict[str, dict]] = {}
    seconds: dict[str, float] = {}
    for rule in candidates:
        t0 = time.perf_counter()
        per_user: dict[str, dict[str, np.ndarray]] = {}
        rows = evaluate_peel(run, data, cfg, budgets, "valid", precision=rule,
                             per_user_out=per_user)
        results[rule] = {r.budget: {**r.metrics, "bytes_used": r.bytes_used,
                                    "budget_bytes": r.budget_bytes} for r in rows}
        seconds[rule] = time.perf_counter() - t0
        if per_user_out is not None:
            per_user_out[rule] = per_user
        if progress:
            shown = ", ".join(f"{b} {results[rule][b][METRIC]:.4f}" for b in budgets)
            print(f"[peel] precision {rule}: validation {METRIC} {shown}", flush=True)
    return results, seconds


def decide(results: Mapping[str, Mapping[str, Mapping[str, float]]],
           candidates: Sequence[str]) -> tuple[str, dict[str, float]]:
    """(chosen rule, mean validation Recall@20 over the budgets of each candidate)."""
    means = {rule: float(np.mean([row[METRIC] for row in results[rule].values()]))
             for rule in candidates}
    return choose(means, candidates), means


def choice_document(run: str | Path, cfg: Any, candidates: Sequence[str],
                    budgets: Sequence[str], results: dict, seconds: dict,
                    digest: dict[str, str] | None = None) -> dict[str, Any]:
    """What RUN/precision.json holds (``digest``: :func:`groups_digest`, when known)."""
    from peel import __version__

    rule, means = decide(results, candidates)
    return {"rule": rule, "split": "valid", "metric": METRIC, "tie": TIE,
            "candidates": list(candidates), "budgets": list(budgets),
            f"mean_{METRIC}": means, "results": results, "seconds": seconds,
            "seed": cfg.run.seed, "groups": digest or groups_digest(run),
            "peel_version": __version__}


def fitting_budgets(run: str | Path, cfg: Any, candidates: Sequence[str],
                    budgets: Sequence[str]) -> list[str]:
    """The budgets at which every user group's package fits under every candidate rule.

    A budget below a package's minimum (one block per item group, the user vector, header and
    index; tiny catalogues) cannot be scored; the choice is made on the others.
    """
    from peel.budget import BudgetError
    from peel.package import kept_pairs
    from peel.pipeline import deploy_options, with_overrides

    base = deploy_options(cfg)
    fits = list(budgets)
    for g, _ in runfolder.group_files(run):
        arrays = runfolder.load_group(run, g)
        for budget in list(fits):
            try:
                for rule in candidates:
                    kept_pairs(arrays.alpha, arrays.item_group, arrays.blocks.shape[2], budget,
                               with_overrides(base, precision=rule), g)
            except BudgetError:
                fits.remove(budget)
    return fits


def is_current(run: str | Path, candidates: Sequence[str], budgets: Sequence[str],
               digest: dict[str, str] | None = None) -> bool:
    """Whether RUN/precision.json was chosen among these candidates at these budgets, on the
    group files the run holds now (``digest``: their :func:`groups_digest`, when known)."""
    path = Path(run) / runfolder.PRECISION_FILE
    if not path.exists():
        return False
    doc = read_json(path)
    return (isinstance(doc, dict) and doc.get("candidates") == list(candidates)
            and doc.get("budgets") == list(budgets)
            and doc.get("groups") == (digest or groups_digest(run)))


def precision_stage(run: str | Path, data: Any, cfg: Any, progress: bool = False) -> str | None:
    """Choose the run's rule (or keep a current choice); None when the run does not choose.

    A run chooses when ``[deploy] precision`` is "auto" and ``[deploy] precision_candidates``
    is not empty; otherwise any earlier choice file is removed, so "auto" means
    :data:`peel.package.DEFAULT_PRECISION` again.
    """
    path = Path(run) / runfolder.PRECISION_FILE
    candidates = list(cfg.deploy.precision_candidates)
    budgets = list(cfg.deploy.budgets)
    if cfg.deploy.precision != "auto" or not candidates:
        path.unlink(missing_ok=True)
        return None
    digest = groups_digest(run)  # hashed once: the check and the new document share it
    if is_current(run, candidates, budgets, digest):
        return runfolder.chosen_precision(run)
    path.unlink(missing_ok=True)  # stale: never read while the new choice is being made
    scored = fitting_budgets(run, cfg, candidates, budgets)
    if not scored:
        return None
    results, seconds = score_candidates(run, data, cfg, candidates, scored, progress=progress)
    doc = choice_document(run, cfg, candidates, budgets, results, seconds, digest)
    doc["scored_budgets"] = scored
    write_json(path, doc)
    return str(doc["rule"])
