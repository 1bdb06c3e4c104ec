"""Validation tuning with the same budget for every method: ``tune(name, data, budget, ...)``.

Why: a comparison in which one method's settings were tuned and the others' were not says
little. Every baseline class declares ``search_space`` (PretrainConfig field -> the values that
may be drawn for it); :func:`tune` gives each method the same number of trials at each size:
trial 0 is the configured setting, trials 1..n-1 are distinct random draws from the method's
space (one value per field, uniformly, from a generator seeded by ``seed`` and the method's
name, so a seed always draws the same trials). Each trial is fitted at the budget and scored on
the VALIDATION split (Recall@20, full ranking); the best is returned with a JSON-able log of
every trial. The test split is never read. A method whose space is empty (``lightgcn-svd``:
no training) has nothing to tune and is fitted once, and its log says so.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from peel.baselines import REGISTRY, EmbeddingRecommender, check_names, make_baseline
from peel.data import InteractionData
from peel.eval import evaluate, selection_recall
from peel.pretrain import PretrainConfig

#: Trials per method and size used for the committed results (trial 0 = the configured one).
DEFAULT_TRIALS = 4
METRIC = "recall@20"
#: Fields that are not hyper-parameters to tune: the budget sets the size, the seed is the seed.
NOT_TUNABLE = frozenset({"dim", "block_dim", "seed", "device", "eval_batch_size"})

Factory = Callable[[PretrainConfig], EmbeddingRecommender]


def check_space(name: str, space: Mapping[str, tuple]) -> None:
    """Refuse a search space naming no PretrainConfig field, a fixed one, or no values."""
    known = {f.name for f in fields(PretrainConfig)}
    for key, values in space.items():
        if key not in known:
            raise ValueError(f"{name}: search_space key {key!r} is not a PretrainConfig field; "
                             f"expected any of {', '.join(sorted(known - NOT_TUNABLE))}")
        if key in NOT_TUNABLE:
            raise ValueError(f"{name}: search_space key {key!r} is not tunable (the budget "
                             "sets the size; the seed is not a hyper-parameter)")
        if not isinstance(values, tuple) or not values:
            raise ValueError(f"{name}: search_space[{key!r}] must be a non-empty tuple of "
                             f"values, got {values!r}")


def draw_trials(name: str, space: Mapping[str, tuple], base: PretrainConfig, n_trials: int,
                seed: int) -> list[dict[str, Any]]:
    """The settings of trials 0..n-1: ``{}`` (the base config) then distinct random draws.

    A draw equal to the base's own setting or to an earlier draw is redrawn; a space with
    fewer distinct settings than ``n_trials`` yields all of them and no more.
    """
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials must be a positive integer, got {n_trials!r}")
    check_space(name, space)
    trials: list[dict[str, Any]] = [{}]
    if not space:
        return trials
    keys = sorted(space)
    own = tuple(getattr(base, k) for k in keys)
    left = int(np.prod([len(set(space[k])) for k in keys]))  # distinct settings not yet taken
    left -= all(v in space[k] for k, v in zip(keys, own, strict=True))
    seen = {own}
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    while len(trials) < n_trials and left > 0:
        draw = tuple(space[k][int(rng.integers(len(space[k])))] for k in keys)
        if draw not in seen:
            seen.add(draw)
            left -= 1
            trials.append(dict(zip(keys, draw, strict=True)))
    return trials


def validation_recall(model: EmbeddingRecommender, data: InteractionData) -> float:
    """Recall@20 of a fitted model on the validation split (full ranking, train excluded;
    the whole catalogue's recall when it has fewer than 20 items, as early stopping does)."""
    return float(selection_recall(evaluate(model.scorer(), data, "valid", ks=(20,)).metrics))


def tune(name: str, data: InteractionData, budget_bytes: int, base_cfg: PretrainConfig,
         n_trials: int = DEFAULT_TRIALS, seed: int = 0, run: str | Path | None = None,
         make: Factory | None = None) -> tuple[EmbeddingRecommender, dict[str, Any]]:
    """Fit baseline ``name`` with each trial's setting at ``budget_bytes``; keep the best.

    Returns the model of the trial with the highest validation Recall@20 (the earliest on a
    tie, so the configured setting wins ties) and the log: the space, every trial's setting,
    validation recall and seconds, and the chosen trial and setting. The log is also stored in
    the model's ``params["tuning"]``. ``make(cfg)`` builds a model (default:
    :func:`peel.baselines.make_baseline`, with ``run`` for ``lightgcn-svd``).
    """
    check_names([name])
    if data.valid.nnz == 0:
        raise ValueError(f"tuning {name}: the data has no validation split to choose on")
    space = REGISTRY[name].search_space
    build = make or (lambda cfg: make_baseline(name, cfg, run=run))
    trials = draw_trials(name, space, base_cfg, n_trials, seed)
    log: list[dict[str, Any]] = []
    best: EmbeddingRecommender | None = None
    best_score, chosen = -1.0, 0
    for index, setting in enumerate(trials):
        cfg = replace(base_cfg, **setting)
        cfg.validate()
        t0 = time.perf_counter()
        model = build(cfg).fit(data, budget_bytes)
        score = validation_recall(model, data)
        log.append({"trial": index, "params": {k: getattr(cfg, k) for k in sorted(space)},
                    f"valid_{METRIC}": score, "seconds": time.perf_counter() - t0,
                    "best_epoch": model.params.get("best_epoch")})
        if score > best_score:
            best, best_score, chosen = model, score, index
    assert best is not None  # trials always holds trial 0
    record: dict[str, Any] = {
        "metric": f"valid {METRIC}", "trials_asked": n_trials, "trials": len(trials),
        "seed": seed, "space": {k: list(v) for k, v in sorted(space.items())},
        "chosen_trial": chosen, "chosen": log[chosen]["params"],
        f"valid_{METRIC}": best_score, "log": log,
    }
    if not space:
        record["note"] = "nothing to tune: the configured setting is the only trial"
    best.params["tuning"] = record
    return best, record
