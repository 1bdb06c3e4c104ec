"""The Python front door: ``peel.PEEL(config).fit(data, out=...) -> peel.Run``.

Everything the command line does goes through here or through :mod:`peel.pipeline`, over one
run-folder contract (:mod:`peel.runfolder`), so a package deployed from Python or from
``peel deploy`` ranks exactly as ``peel evaluate`` measured it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from peel import pipeline, runfolder
from peel.data import InteractionData
from peel.device import Package, read_package
from peel.executor import Executor
from peel.package import DeployOptions
from peel.pipeline import EvalRow, RunConfig

DataLike = str | Path | InteractionData


class PEEL:
    r"""Personalized Elastic Embedding Learning (Zheng et al.), trained on a server and
    deployed to devices under a memory budget.

    Stage 1 pretrains LightGCN with a diversity regularizer over N blocks of d dimensions;
    users are clustered into groups, items split by popularity into G_v item groups, and every
    user group fine-tunes its own item blocks e_n^j with importance weights alpha. For a budget
    a package keeps, per item group, the highest-weight blocks S_j that fit, and a device ranks
    item j for user u_i with Eq. 10 of the paper:

    .. math::

        r_{ij} = \frac{\max_k |S_k|}{|S_j|} \sum_{n \in S_j} u_i^\top \bar{e}_n^j

    (by measurement the default drops the max_k |S_k| / |S_j| factor: ``[deploy] scale``).

    Example::

        run = peel.PEEL(peel.demo_config()).fit("demo", out="runs/demo")
        rows = run.evaluate(["0.107"])
    """

    def __init__(self, config: RunConfig | None = None, *, seed: int | None = None,
                 workers: int | None = None) -> None:
        cfg = config or RunConfig()
        if seed is not None:
            cfg = cfg.with_seed(seed)
        if workers is not None:
            cfg = replace(cfg, run=replace(cfg.run, workers=workers))
        cfg.validate()
        self.config = cfg

    def fit(self, data: DataLike = "demo", out: str | Path | None = None,
            progress: bool = False, executor: Executor | None = None) -> Run:
        """Train every server stage into run folder ``out`` (resumes an interrupted one).

        ``data``: a dataset path, ``"demo"`` / ``"demo:SEED"``, or an in-memory
        :class:`~peel.data.InteractionData`, which is saved into the run so that evaluation
        and deployment later use exactly its splits. Without ``out`` a temporary folder is
        made (its path is ``run.path``). ``executor`` runs the group fine-tuning (e.g.
        ``peel.executor.RayExecutor()``); results do not depend on it.
        """
        folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="peel-run-"))
        if isinstance(data, InteractionData):
            pipeline.train(self.config, folder, progress=progress, data=data,
                           executor=executor)
        else:
            cfg = replace(self.config, run=replace(self.config.run, data=str(data)))
            pipeline.train(cfg, folder, progress=progress, executor=executor)
        return Run.load(folder)


class Run:
    """A trained run folder: evaluate it, or deploy packages from it."""

    def __init__(self, path: str | Path) -> None:
        self.path = runfolder.require_run(path)
        self.config = pipeline.load_run_config(self.path)
        self._data: InteractionData | None = None

    @classmethod
    def load(cls, path: str | Path) -> Run:
        """Open a run folder written by :meth:`PEEL.fit` or ``peel train``."""
        return cls(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def data(self) -> InteractionData:
        """The dataset the run was trained on, verified against the run's record."""
        if self._data is None:
            self._data = pipeline.run_data(self.path, self.config)
        return self._data

    @property
    def deploy_options(self) -> DeployOptions:
        """How this run builds packages (``[deploy]`` settings, then training's)."""
        return pipeline.deploy_options(self.config, self.path)

    def missing_groups(self) -> list[int]:
        """User groups whose fine-tuning never finished (empty for a complete run)."""
        return runfolder.missing_groups(self.path)

    def evaluate(self, budgets: Sequence[str] | None = None, split: str = "test",
                 baselines: bool | Sequence[str] = False, partial: bool = False,
                 progress: bool = False, tune_trials: int = 0, reference: bool = False,
                 executor: Executor | None = None) -> list[EvalRow]:
        """Recall/NDCG of every user group's package at every budget, ranked on the device
        runtime (``budgets`` default to ``[deploy] budgets``). ``baselines``: True for the
        run's list or names such as ``["pmf", "lightgcn-svd"]``, one ``executor`` task per
        method x budget when given; ``tune_trials`` > 0 tunes each baseline at each budget on
        the validation split (:mod:`peel.tuning`) and records the chosen setting in the row's
        ``detail["tuning"]``; ``reference`` adds PEEL with every block kept and the
        pretrained model (budget "all"). Test rows are also saved to RUN/eval.json;
        ``split="valid"`` is for choosing settings and saves nothing."""
        return pipeline.evaluate(self.path, budgets, baselines=baselines, progress=progress,
                                 split=split, partial=partial, tune_trials=tune_trials,
                                 reference=reference, executor=executor)

    def rankings(self, budget: str, split: str = "test",
                 partial: bool = False) -> dict[int, np.ndarray]:
        """User -> the top-k item list :meth:`evaluate` scores at ``budget`` (no -1 pads)."""
        runfolder.check_complete(self.path, partial)
        out: dict[int, np.ndarray] = {}
        for ranked in pipeline.peel_rankings(self.path, self.data, self.config, [budget],
                                             split):
            for user, items in zip(ranked.users.tolist(), ranked.items, strict=True):
                out[int(user)] = items[items >= 0]
        return out

    def package(self, budget: int | float | str, *, user: int | None = None,
                group: int | None = None, out: str | Path | None = None,
                partial: bool = False, **overrides: Any) -> Package:
        """The device package of one user (``user=``) or one user group (``group=``).

        Built with the run's deploy settings (``overrides``: similarity, weighting, scale,
        selection, seed, precision), so it ranks as :meth:`evaluate` measured. Written to
        ``out`` when given, else kept in memory. ``budget``: bytes, "5MB", or a fraction of the
        table. ``precision="fp32"`` gives the float32 (format v3) package of earlier versions;
        the default, the run's ``[deploy] precision`` ("auto"), stores blocks by the rule the
        run chose on its validation split (RUN/precision.json), else by
        :data:`peel.package.DEFAULT_PRECISION`.
        """
        if out is not None:
            pipeline.deploy_package(self.path, budget, out, user=user, group=group,
                                    partial=partial, **overrides)
            return read_package(Path(out).read_bytes(), name=str(out))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "package.peel"
            pipeline.deploy_package(self.path, budget, path, user=user, group=group,
                                    partial=partial, **overrides)
            return read_package(path.read_bytes(), name=f"{self.path} package")

    def recommender(self, budget: int | float | str) -> PEELRecommender:
        """This run at one budget behind the baselines' interface (for comparisons)."""
        return PEELRecommender.from_run(self, budget)


class PEELRecommender:
    """PEEL behind :class:`peel.baselines.BudgetedRecommender`: a run at one budget.

    ``fit(data, budget_bytes)`` trains a run (into ``out`` or a temporary folder) and builds
    every user group's package at the budget; users are scored and ranked by their group's
    package on the device runtime, exactly as ``peel evaluate`` does.
    """

    name = "peel"
    label = "PEEL"

    def __init__(self, config: RunConfig | None = None, out: str | Path | None = None) -> None:
        self.config = config or RunConfig()
        self.out = out
        self.run: Run | None = None
        self.packages: dict[int, Package] = {}
        self.group_of: np.ndarray | None = None
        self.row_of: np.ndarray | None = None
        self.user_emb: dict[int, np.ndarray] = {}
        self.bytes_used = 0
        self.params: dict[str, Any] = {}
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @classmethod
    def from_run(cls, run: Run, budget: int | float | str) -> PEELRecommender:
        model = cls(run.config)
        model._deploy(run, budget)
        return model

    def fit(self, data: InteractionData, budget_bytes: int) -> PEELRecommender:
        out = self.out
        if out is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="peel-run-")
            out = self._tmp.name
        run = PEEL(self.config).fit(data, out=out)
        self._deploy(run, budget_bytes)
        return self

    def _deploy(self, run: Run, budget: int | float | str) -> None:
        data = run.data
        self.run = run
        self.group_of = np.full(data.n_users, -1, dtype=np.int64)
        self.row_of = np.full(data.n_users, -1, dtype=np.int64)
        self.packages, self.user_emb = {}, {}
        for g, _ in runfolder.group_files(run.path):
            arrays = runfolder.load_group(run.path, g)
            self.group_of[arrays.users] = g
            self.row_of[arrays.users] = np.arange(len(arrays.users))
            self.user_emb[g] = arrays.user_emb
            self.packages[g] = run.package(budget, group=g)
        self.bytes_used = max(p.report.total for p in self.packages.values())
        self.params = {"blocks_kept": {g: p.n_selected for g, p in self.packages.items()},
                       "k": run.config.deploy.k, **vars(run.deploy_options)}

    def _fitted(self) -> tuple[Run, np.ndarray, np.ndarray]:
        if self.run is None or self.group_of is None or self.row_of is None:
            raise ValueError("PEEL: call fit(data, budget_bytes) first")
        return self.run, self.group_of, self.row_of

    def _by_group(self, users: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(group, positions in ``users``) for every group the users belong to."""
        _, group_of, _ = self._fitted()
        groups = group_of[users]
        if (groups < 0).any():
            raise ValueError(f"user {int(users[groups < 0][0])} is in no group of the run")
        return [(int(g), np.flatnonzero(groups == g)) for g in np.unique(groups)]

    def scores(self, users: np.ndarray) -> np.ndarray:
        run, _, row_of = self._fitted()
        users = np.asarray(users, dtype=np.int64)
        out = np.empty((len(users), run.data.n_items), dtype=np.float32)
        for g, pos in self._by_group(users):
            out[pos] = self.packages[g].scores(self.user_emb[g][row_of[users[pos]]])
        seen = run.data.train[users]
        out[np.repeat(np.arange(len(users)), np.diff(seen.indptr)), seen.indices] = -np.inf
        return out

    def rank(self, users: np.ndarray, k: int = 20, split: str = "test") -> np.ndarray:
        run, _, row_of = self._fitted()
        users = np.asarray(users, dtype=np.int64)
        out = np.full((len(users), min(k, run.data.n_items)), -1, dtype=np.int64)
        seen = run.data.seen_matrix(split)
        for g, pos in self._by_group(users):
            rows = seen[users[pos]]
            ranked = self.packages[g].rank_batch(
                self.user_emb[g][row_of[users[pos]]], k=k, exclude_indptr=rows.indptr,
                exclude_indices=rows.indices)
            out[pos] = ranked.items
        return out


def demo_config(seed: int = 0) -> RunConfig:
    """The configuration ``peel demo`` trains with (sized for the built-in demo data)."""
    return pipeline.demo_config(seed)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """A configuration from a TOML file (None: the paper's defaults) plus ``section.key=value``
    overrides, checked strictly (``deploy.k=2.5`` is refused, naming key and type)."""
    from peel.overrides import apply_overrides

    cfg = apply_overrides(pipeline.load_config(path), list(overrides))
    cfg.validate()
    return cfg
