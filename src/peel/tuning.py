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

import shutil
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
from peel.io import atomic_path, read_json, write_json
from peel.pretrain import PretrainConfig, check_saved_config, pretrain, save_result

#: Trials per method and size used for the committed results (trial 0 = the configured one).
DEFAULT_TRIALS = 4
METRIC = "recall@20"
#: Fields that are not hyper-parameters to tune: the budget sets the size, the seed is the seed.
NOT_TUNABLE = frozenset({"dim", "block_dim", "seed", "device", "eval_batch_size", "trials"})

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


def fit_trial(name: str, data: InteractionData, budget_bytes: int, base_cfg: PretrainConfig,
              index: int, setting: Mapping[str, Any], build: Factory
              ) -> tuple[EmbeddingRecommender, dict[str, Any]]:
    """Fit one trial (``setting`` over ``base_cfg``) at the budget; score it on validation.

    Returns the model and its log entry. Trials are independent, so an executor may run the
    trials of many methods and sizes at once (:func:`peel.pipeline.evaluate_baselines`).
    """
    space = REGISTRY[name].search_space
    cfg = replace(base_cfg, **setting)
    cfg.validate()
    t0 = time.perf_counter()
    model = build(cfg).fit(data, budget_bytes)
    score = validation_recall(model, data)
    return model, {"trial": index, "params": {k: getattr(cfg, k) for k in sorted(space)},
                   f"valid_{METRIC}": score, "seconds": time.perf_counter() - t0,
                   "best_epoch": model.params.get("best_epoch")}


def first_best(scores: list[float]) -> int:
    """The index of the highest score, the earliest on a tie (so trial 0, the configured
    setting, wins ties): the one choice rule of every tuning here."""
    return int(np.argmax(scores))


def choose(name: str, fitted: list[tuple[EmbeddingRecommender, dict[str, Any]]],
           n_trials: int, seed: int) -> tuple[EmbeddingRecommender, dict[str, Any]]:
    """The trial with the highest validation Recall@20 (the earliest on a tie, so the
    configured setting wins ties), with the log of every trial in ``params["tuning"]``."""
    if not fitted:
        raise ValueError(f"tuning {name}: no trial was fitted")
    fitted = sorted(fitted, key=lambda pair: pair[1]["trial"])
    scores = [entry[f"valid_{METRIC}"] for _, entry in fitted]
    chosen = first_best(scores)
    space = REGISTRY[name].search_space
    log = [entry for _, entry in fitted]
    best = fitted[chosen][0]
    record: dict[str, Any] = {
        "metric": f"valid {METRIC}", "trials_asked": n_trials, "trials": len(fitted),
        "seed": seed, "space": {k: list(v) for k, v in sorted(space.items())},
        "chosen_trial": chosen, "chosen": log[chosen]["params"],
        f"valid_{METRIC}": scores[chosen], "log": log,
    }
    if not space:
        record["note"] = "nothing to tune: the configured setting is the only trial"
    best.params["tuning"] = record
    return best, record


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
    build = make or (lambda cfg: make_baseline(name, cfg, run=run))
    trials = draw_trials(name, REGISTRY[name].search_space, base_cfg, n_trials, seed)
    fitted = [fit_trial(name, data, budget_bytes, base_cfg, index, setting, build)
              for index, setting in enumerate(trials)]
    return choose(name, fitted, n_trials, seed)


# ---------------------------------------------------------------------------------------------
# Stage 1 of PEEL, tuned with the same budget (`[pretrain] trials`)
# ---------------------------------------------------------------------------------------------

#: PEEL's stage 1 is a LightGCN: it draws its trials from the LightGCN baseline's space with
#: the baseline's generator, so both get the same candidate settings at the same seed.
STAGE1_SPACE = "lightgcn"
TUNING_FILE = "tuning.json"


def stage1_trials(cfg: PretrainConfig) -> list[dict[str, Any]]:
    """Settings of stage 1's ``cfg.trials`` trials: ``{}`` (cfg itself), then the draws
    that the LightGCN baseline gets with seed ``cfg.seed``."""
    return draw_trials(STAGE1_SPACE, REGISTRY[STAGE1_SPACE].search_space, cfg, cfg.trials,
                       cfg.seed)


def chosen_stage1_config(cfg: PretrainConfig, stage: str | Path) -> PretrainConfig:
    """The config stage 1's embeddings in ``stage`` were made with: ``cfg`` itself, or with
    ``cfg.trials`` > 1 the chosen trial's (from ``stage``/tuning.json)."""
    if cfg.trials == 1:
        return cfg
    path = Path(stage) / TUNING_FILE
    if not path.exists():
        raise ValueError(f"{path}: missing; stage 1 was tuned ([pretrain] trials = "
                         f"{cfg.trials}) but its choice is not recorded; delete {stage} to "
                         "retrain it")
    return replace(cfg, **read_json(path)["chosen"], trials=1)


def _train_stage1_trial(task: tuple[PretrainConfig, str], data: InteractionData) -> None:
    """One stage-1 trial into its folder (an executor's task; module level so it pickles)."""
    trial_cfg, folder_name = task
    folder = Path(folder_name)
    t0 = time.perf_counter()
    result = pretrain(data, trial_cfg, out_dir=folder / "checkpoint", progress=False)
    save_result(result, folder)
    write_json(folder / "seconds.json", {"seconds": time.perf_counter() - t0})
    shutil.rmtree(folder / "checkpoint", ignore_errors=True)


def tune_stage1(data: InteractionData, cfg: PretrainConfig, stage: str | Path,
                progress: bool = True, executor: Any = None) -> PretrainConfig:
    """Train stage 1 once per trial; keep the one with the best validation Recall@20.

    Why: the baselines are tuned on validation with ``trials`` settings per size; PEEL's
    stage 1, the model everything after it starts from, gets the same number and the same
    candidates. Each trial trains into ``stage/trials/trialK`` (its own checkpoint, so an
    interrupted trial resumes and a finished one, checked against its setting, is not redone;
    the checkpoint is removed once the trial is saved). ``executor`` (a
    :mod:`peel.executor` one) trains the unfinished trials side by side; each trial's result
    does not depend on it. The chosen trial's embeddings, log and config are copied to
    ``stage``, and ``stage/tuning.json`` records every trial. Returns the chosen config.
    """
    stage = Path(stage)
    space = REGISTRY[STAGE1_SPACE].search_space
    configs = [replace(cfg, **setting, trials=1) for setting in stage1_trials(cfg)]
    folders = [stage / "trials" / f"trial{index}" for index in range(len(configs))]
    todo = []
    for trial_cfg, folder in zip(configs, folders, strict=True):
        if (folder / "embeddings.safetensors").exists():
            check_saved_config(folder, trial_cfg)  # a finished trial of this very setting
        else:
            todo.append((trial_cfg, str(folder)))
    if executor is not None and len(todo) > 1:
        executor.map(_train_stage1_trial, todo, shared=data,
                     labels=[Path(f).name for _, f in todo])
    else:
        for task in todo:
            if progress:
                print(f"[peel] stage-1 {Path(task[1]).name} of {len(configs)}", flush=True)
            _train_stage1_trial(task, data)
    log: list[dict[str, Any]] = []
    for index, (trial_cfg, folder) in enumerate(zip(configs, folders, strict=True)):
        saved = read_json(folder / "pretrain_log.json")
        seconds = read_json(folder / "seconds.json")["seconds"] if (
            folder / "seconds.json").exists() else None
        log.append({"trial": index, "params": {k: getattr(trial_cfg, k) for k in sorted(space)},
                    f"valid_{METRIC}": selection_recall(saved["valid"]) if saved["valid"]
                    else -1.0, "best_epoch": saved["best_epoch"], "seconds": seconds})
    scores = [entry[f"valid_{METRIC}"] for entry in log]
    chosen = first_best(scores)
    write_json(stage / TUNING_FILE, {
        "metric": f"valid {METRIC}", "trials": cfg.trials, "seed": cfg.seed,
        "space_of": STAGE1_SPACE, "space": {k: list(v) for k, v in sorted(space.items())},
        "chosen_trial": chosen, "chosen": log[chosen]["params"],
        f"valid_{METRIC}": scores[chosen], "log": log})
    # the embeddings last: their presence is what marks stage 1 as done
    source = stage / "trials" / f"trial{chosen}"
    for name in ("pretrain_log.json", "pretrain_config.json", "embeddings.safetensors"):
        with atomic_path(stage / name) as tmp:
            shutil.copyfile(source / name, tmp)
    return replace(cfg, **log[chosen]["params"], trials=1)
