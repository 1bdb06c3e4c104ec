"""RULE (Chen et al., KDD 2021): elastic item embeddings searched per budget by evolution.

What RULE is, and what this module reuses from PEEL:

* **Elastic item table.** One full item table of N blocks of d dimensions (N=16, d=8 by
  default), trained with the diversity-driven regularizer between blocks, and items split into
  G popularity groups (G=20); every item of a group keeps the same subset of blocks. That is
  exactly PEEL's stage 1 (:mod:`peel.pretrain`, LightGCN + Eq. 2) and PEEL's popularity item
  groups (:func:`peel.groups.make_item_groups`), so :meth:`Rule.from_run` reuses a run's
  pretrained embeddings and its item partition (``RUN/pretrain``, ``RUN/partition.npz``);
  standalone, :meth:`Rule.fit` pretrains with its :class:`~peel.pretrain.PretrainConfig` first.
  The blocks are used as pretrained (no rotation, no fine-tuning): RULE has no stage 2.
  There are no user groups: one configuration serves every user.
* **Performance estimator.** A configuration is a (G, N) block mask. For each budget,
  ``n_configs`` random masks that fit the budget are labelled with their measured Recall@20
  on the VALIDATION split (never test; the authors' reimplementation labels from test users),
  over a fixed random subset of ``eval_users`` validation users. A small NFM (neural
  factorisation machine, as in the paper) over the sparse features "group g keeps block n"
  (the group one-hot crossed with the block mask, G * N binary features) learns to predict
  that recall; a share ``holdout`` of the labelled masks is held back and the estimator's
  Spearman rank correlation with their measured recall is reported in ``params``.
* **Search.** Regularised evolution (population 20, 50 cycles, tournament sample 5, as in the
  authors' code) maximises the estimator's prediction over masks within the budget. The
  winner is deployed as a PEEL package (:mod:`peel.budget` byte-exact layout, written by
  :func:`peel.device.write_package`) and ranked by the same numpy runtime with Eq. 10's
  similarity and PEEL's default deploy settings, so recall and latency are comparable.
  Every budget is a new labelling, estimator and search; together they are RULE's
  "deployment time" for that budget (``params["deploy_seconds"]``).

Labelling cost: one configuration is one GEMM of the evaluated users against the masked item
table (|U_s| x |V| x D multiply-adds) plus a top-20. Precomputing the per-block partial scores
u_n . e_j^n instead would need |U_s| x |V| x N floats: 2.6 GB for 1,000 gowalla users, so the
masked GEMM is used everywhere (about 5 GFLOP per configuration on gowalla, 0.5 on ml-1m).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from peel.baselines.base import EmbeddingRecommender
from peel.budget import BudgetError, PackageSpec, layout, minimum_message
from peel.data import InteractionData
from peel.device import Package, read_package, write_package
from peel.eval import Scorer
from peel.executor import deterministic_torch
from peel.groups import GroupConfig, make_item_groups
from peel.io import read_json
from peel.package import DEFAULT_SCALE
from peel.pretrain import PretrainConfig, load_embeddings, pretrain

#: Eq. 10 as PEEL deploys it: block n of an item meets chunk n of the user ("aligned"), no
#: importance weights (RULE has none). The scale (Eq. 10's factor or not) follows RuleConfig.
SIMILARITY = "aligned"
WEIGHTING = "none"


@dataclass(frozen=True)
class RuleConfig:
    """RULE's own settings; stage 1 is a :class:`~peel.pretrain.PretrainConfig`.

    Defaults: the paper's G=20 item groups, the authors' evolution (population 20, 50 cycles,
    sample 5); 2,000 labelled configurations per budget over 1,000 validation users.
    """

    n_item_groups: int = 20  # G, used when no run's partition is given
    n_configs: int = 2000  # random configurations labelled per budget
    eval_users: int = 1000  # fixed random validation users that label them
    holdout: float = 0.2  # share of labelled configurations held back for the Spearman check
    full_share: float = 0.5  # share of sampled configurations filled up to the budget
    population: int = 20
    cycles: int = 50
    sample: int = 5
    factors: int = 16  # NFM embedding size per feature
    hidden: int = 32  # NFM hidden layer after bi-interaction pooling
    epochs: int = 400  # full-batch Adam steps of the estimator
    lr: float = 1e-2
    weight_decay: float = 1e-2  # holdout Spearman 0.965 vs 0.49 at 1e-5 (ml-1m valid labels)
    scale: str | None = None  # Eq. 10's factor: None = PEEL's default (peel.package)
    k: int = 20  # Recall@k is what the estimator predicts
    seed: int | None = None  # None: the PretrainConfig's seed

    def validate(self) -> None:
        if self.n_item_groups < 1:
            raise ValueError("rule: n_item_groups must be >= 1")
        if self.n_configs < 10 or self.eval_users < 1 or self.k < 1:
            raise ValueError("rule: n_configs must be >= 10, eval_users and k >= 1")
        if not 0 < self.holdout < 1 or not 0 <= self.full_share <= 1:
            raise ValueError("rule: holdout must be in (0, 1) and full_share in [0, 1]")
        if self.population < 2 or self.cycles < 0 or not 1 <= self.sample <= self.population:
            raise ValueError("rule: need population >= 2, cycles >= 0, 1 <= sample <= "
                             "population")
        if self.factors < 1 or self.hidden < 1 or self.epochs < 1 or self.lr <= 0:
            raise ValueError("rule: factors, hidden, epochs must be >= 1 and lr > 0")
        if self.scale not in (None, "none", "eq10"):
            raise ValueError(f"rule: scale {self.scale!r}: choose none or eq10")


# --------------------------------------------------------------------------- budget accounting


class Budgeter:
    """Exact bytes of a RULE package for a block mask, through PEEL's package layout.

    The size depends only on how many (group, block) pairs are kept and how many item rows
    they cover, so totals are cached on that pair.
    """

    def __init__(self, item_group: np.ndarray, n_groups: int, n_blocks: int, block_dim: int,
                 scale: str) -> None:
        self.counts = np.bincount(item_group, minlength=n_groups).astype(np.int64)
        self.spec = PackageSpec(
            n_items=len(item_group), n_blocks=n_blocks, block_dim=block_dim,
            group_counts=tuple(int(c) for c in self.counts), similarity=SIMILARITY,
            weighting=WEIGHTING, scale=scale)
        self._cache: dict[tuple[int, int], int] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return self.spec.n_groups, self.spec.n_blocks

    def total(self, mask: np.ndarray) -> int:
        """Bytes that count against the budget (the user embedding reserved included)."""
        n = int(mask.sum())
        rows = int(mask.sum(axis=1) @ self.counts)
        key = (n, rows)
        if key not in self._cache:
            self._cache[key] = layout(self.spec, n, rows, 0).report.total
        return self._cache[key]

    def fits(self, mask: np.ndarray, budget: int) -> bool:
        return bool(mask.any(axis=1).all()) and self.total(mask) <= budget

    def check_minimum(self, budget: int) -> None:
        """Refuse a budget that cannot keep one block per item group, naming the minimum."""
        one = np.zeros(self.shape, dtype=bool)
        one[:, 0] = True
        if self.total(one) > budget:
            report = layout(self.spec, self.spec.n_groups, int(self.counts.sum()), budget).report
            raise BudgetError("rule: " + minimum_message(budget, report, self.spec))


def selection_of(mask: np.ndarray) -> np.ndarray:
    """Package selection order of a mask: each group's lowest kept block first (the device
    needs one block per group up front), then the other kept pairs by (group, block)."""
    pairs = np.argwhere(mask)  # row-major: sorted by group, then block
    first = np.zeros(len(pairs), dtype=bool)
    first[np.unique(pairs[:, 0], return_index=True)[1]] = True
    return np.concatenate([pairs[first], pairs[~first]]).astype(np.int64)


# --------------------------------------------------------------------------- configurations


def random_config(rng: np.random.Generator, budgeter: Budgeter, budget: int,
                  fill: bool) -> np.ndarray:
    """A random mask within ``budget``: one random block per group, then random extra pairs,
    up to the budget (``fill``) or up to a uniformly drawn number of them."""
    n_groups, n_blocks = budgeter.shape
    mask = np.zeros((n_groups, n_blocks), dtype=bool)
    mask[np.arange(n_groups), rng.integers(n_blocks, size=n_groups)] = True
    rest = rng.permutation(np.flatnonzero(~mask.ravel()))
    lo, hi = 0, len(rest)  # the longest prefix of ``rest`` that fits: cost is monotone
    while lo < hi:
        mid = (lo + hi + 1) // 2
        trial = mask.copy()
        trial.flat[rest[:mid]] = True
        lo, hi = (mid, hi) if budgeter.fits(trial, budget) else (lo, mid - 1)
    take = lo if fill else int(rng.integers(lo + 1))
    mask.flat[rest[:take]] = True
    return mask


def mutate(mask: np.ndarray, rng: np.random.Generator, budgeter: Budgeter, budget: int,
           tries: int = 100) -> np.ndarray:
    """One random change within the budget: flip one (group, block) pair, or move a kept
    pair elsewhere (same size, so a configuration at the budget can still change). Every
    group keeps a block; after ``tries`` rejected draws the parent is returned unchanged."""
    for _ in range(tries):
        child = mask.copy()
        if rng.random() < 0.5:
            child.flat[int(rng.integers(child.size))] ^= True
        else:
            on, off = np.flatnonzero(child), np.flatnonzero(~child)
            if off.size == 0:
                continue
            child.flat[int(rng.choice(on))] = False
            child.flat[int(rng.choice(off))] = True
        if not np.array_equal(child, mask) and budgeter.fits(child, budget):
            return child
    return mask.copy()


@dataclass
class Evolution:
    """Outcome of :func:`regularized_evolution`: the best mask seen and every fitness."""

    best: np.ndarray
    best_fitness: float
    history: list[float] = field(default_factory=list)


def regularized_evolution(fitness: Callable[[np.ndarray], float],
                          init: Callable[[], np.ndarray],
                          mutation: Callable[[np.ndarray], np.ndarray],
                          rng: np.random.Generator, population: int = 20, cycles: int = 50,
                          sample: int = 5) -> Evolution:
    """Real et al.'s aging evolution: each cycle the fittest of ``sample`` random members
    is mutated, the child joins and the oldest member leaves; the best ever is returned."""
    pop: deque[tuple[np.ndarray, float]] = deque()
    best: tuple[np.ndarray, float] | None = None
    history: list[float] = []

    def add(mask: np.ndarray) -> None:
        nonlocal best
        score = float(fitness(mask))
        pop.append((mask, score))
        history.append(score)
        if best is None or score > best[1]:
            best = (mask, score)

    for _ in range(population):
        add(init())
    for _ in range(cycles):
        picks = rng.choice(len(pop), size=sample, replace=False)
        parent = max((pop[int(i)] for i in picks), key=lambda m: m[1])
        add(mutation(parent[0]))
        pop.popleft()
    assert best is not None
    return Evolution(best[0].copy(), best[1], history)


# --------------------------------------------------------------------------- labelling


class ValidationLabeller:
    """Measured validation Recall@k of block masks over a fixed subset of validation users.

    One configuration: scores = U_s (E * mask)^T with Eq. 10's factor per item group when
    ``scale="eq10"``, training items excluded, top-k against the users' validation items. This
    is the package runtime's Eq. 10 ("aligned", unweighted) in bulk, so the labels measure
    what would be deployed (a test checks the two agree).
    """

    def __init__(self, data: InteractionData, user_emb: np.ndarray, item_emb: np.ndarray,
                 item_group: np.ndarray, block_dim: int, users: np.ndarray, k: int,
                 scale: str) -> None:
        self.users = np.asarray(users, dtype=np.int64)
        self.k = min(k, data.n_items)
        self.scale = scale
        self.block_dim = block_dim
        self.item_group = torch.from_numpy(np.asarray(item_group, dtype=np.int64))
        self.u = torch.from_numpy(np.ascontiguousarray(user_emb[self.users], np.float32))
        self.e = torch.from_numpy(np.ascontiguousarray(item_emb, np.float32))
        seen = data.seen_matrix("valid")[self.users].tocoo()
        self.exclude = torch.zeros(len(self.users), data.n_items)
        self.exclude[torch.from_numpy(seen.row.astype(np.int64)),
                     torch.from_numpy(seen.col.astype(np.int64))] = -torch.inf
        truth = data.split_matrix("valid")[self.users]
        self.truth = torch.from_numpy(truth.toarray() > 0)
        self.n_truth = torch.from_numpy(truth.getnnz(axis=1).astype(np.float64))
        if (self.n_truth == 0).any():
            raise ValueError("rule: every labelling user needs a validation item")

    def item_table(self, mask: np.ndarray) -> torch.Tensor:
        """The item table as the device sees it: dropped blocks zero, Eq. 10 factor applied."""
        keep = torch.from_numpy(np.repeat(mask, self.block_dim, axis=1).astype(np.float32))
        table = self.e * keep[self.item_group]
        if self.scale == "eq10":
            counts = mask.sum(axis=1)
            factors = torch.from_numpy((counts.max() / counts).astype(np.float32))
            table = table * factors[self.item_group][:, None]
        return table

    def recall(self, mask: np.ndarray) -> float:
        with torch.inference_mode():
            scores = self.u @ self.item_table(mask).T
            scores += self.exclude
            top = torch.topk(scores, self.k, dim=1, sorted=False).indices
            hits = self.truth.gather(1, top).sum(dim=1).double()
            return float((hits / self.n_truth).mean())


def pick_eval_users(data: InteractionData, n: int, seed: int) -> np.ndarray:
    """A fixed random subset of validation users (sorted), the same for every budget."""
    candidates = np.flatnonzero(data.valid.getnnz(axis=1) > 0)
    if candidates.size == 0:
        raise ValueError("rule: the data has no validation split; RULE labels its "
                         "configurations on validation users")
    rng = np.random.default_rng([seed, 0x52554C45])
    if candidates.size > n:
        candidates = np.sort(rng.choice(candidates, size=n, replace=False))
    return candidates


# --------------------------------------------------------------------------- estimator


class NFM(torch.nn.Module):
    """Neural factorisation machine over binary features x (one per (group, block) pair):
    y = b + w . x + MLP(0.5 * ((x V)^2 - x V^2)), the bi-interaction pooling of He & Chua."""

    def __init__(self, n_features: int, factors: int, hidden: int,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(1))
        self.linear = torch.nn.Parameter(torch.zeros(n_features))
        self.v = torch.nn.Parameter(0.1 * torch.randn(n_features, factors, generator=generator))
        self.hidden = torch.nn.Linear(factors, hidden)
        self.out = torch.nn.Linear(hidden, 1)
        with torch.no_grad():  # torch's default init draws from the global RNG
            for layer in (self.hidden, self.out):
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator)
                                   * 2 * bound - bound)
                layer.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x @ self.v
        bi = 0.5 * (s * s - x @ (self.v * self.v))
        return self.bias + x @ self.linear + self.out(torch.relu(self.hidden(bi))).squeeze(-1)


class Estimator:
    """Predicts a mask's validation Recall@k; trained on labelled masks (MSE, full batch)."""

    def __init__(self, cfg: RuleConfig, n_features: int, seed: int) -> None:
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(seed)
        self.model = NFM(n_features, cfg.factors, cfg.hidden, self.generator)
        self.mean = 0.0
        self.std = 1.0

    def fit(self, masks: np.ndarray, recall: np.ndarray) -> Estimator:
        x = torch.from_numpy(masks.reshape(len(masks), -1).astype(np.float32))
        y = torch.from_numpy(np.asarray(recall, dtype=np.float32))
        self.mean = float(y.mean())
        self.std = float(y.std()) if len(y) > 1 and float(y.std()) > 0 else 1.0
        target = (y - self.mean) / self.std
        opt = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr,
                               weight_decay=self.cfg.weight_decay)
        with deterministic_torch():
            for _ in range(self.cfg.epochs):
                opt.zero_grad()
                loss = torch.mean((self.model(x) - target) ** 2)
                loss.backward()
                opt.step()
        return self

    def predict(self, masks: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.asarray(masks).reshape(-1, self.model.linear.shape[0])
                             .astype(np.float32))
        with torch.inference_mode():
            return (self.model(x) * self.std + self.mean).numpy().astype(np.float64)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); nan when either side is constant."""
    from scipy.stats import spearmanr

    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


# --------------------------------------------------------------------------- the package


def write_rule_package(path: str | Path, item_emb: np.ndarray, item_group: np.ndarray,
                       mask: np.ndarray, budgeter: Budgeter, budget: int) -> Package:
    """Write the package that keeps exactly ``mask`` and open it with the device runtime.

    Same format as PEEL's group packages (no user stored: its D floats are reserved), with
    RULE's pairs as the selection and unit weights (RULE has no importance weights).
    """
    spec = budgeter.spec
    order = selection_of(mask)
    rows = int(budgeter.counts[order[:, 0]].sum())
    lay = layout(spec, len(order), rows, budget)
    if lay.report.total > budget:
        raise BudgetError(f"rule: configuration of {lay.report.total:,} B exceeds the budget "
                          f"{budget:,} B")
    stored = np.argsort(item_group, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(budgeter.counts)]).astype(np.int64)
    d = spec.block_dim

    def parts() -> Any:
        for g, n in order.tolist():
            items = stored[offsets[g]: offsets[g + 1]]
            yield np.ascontiguousarray(item_emb[items, n * d:(n + 1) * d].T)

    write_package(path, lay, {
        "group_offsets": offsets, "item_group": item_group.astype(spec.label_dtype),
        "selection": order.astype("<u2"), "weights": np.ones(len(order), "<f4"),
        "blocks": parts()})
    return read_package(Path(path).read_bytes(), name=f"RULE package ({budget:,} B)")


# --------------------------------------------------------------------------- the baseline


class Rule(EmbeddingRecommender):
    """RULE behind the common interface: one searched block configuration for all users."""

    name: ClassVar[str] = "rule"
    label: ClassVar[str] = "RULE"
    #: Nothing of its own to tune: stage 1 is PEEL's (reused from the run), and the
    #: estimator / evolution settings are the paper's and the authors' (RuleConfig).
    search_space: ClassVar[dict[str, tuple]] = {}

    def __init__(self, config: PretrainConfig | None = None,
                 rule: RuleConfig | None = None) -> None:
        super().__init__(config)
        self.rule = rule or RuleConfig()
        self.rule.validate()
        self.pretrained: tuple[np.ndarray, np.ndarray] | None = None
        self.item_group: np.ndarray | None = None
        self.stage1_seconds = 0.0
        self.package: Package | None = None
        self.mask: np.ndarray | None = None

    @property
    def seed(self) -> int:
        return self.config.seed if self.rule.seed is None else self.rule.seed

    @classmethod
    def from_embeddings(cls, user_emb: np.ndarray, item_emb: np.ndarray,
                        config: PretrainConfig | None = None, rule: RuleConfig | None = None,
                        item_group: np.ndarray | None = None) -> Rule:
        """Start from already pretrained tables (and optionally an item partition)."""
        model = cls(config, rule)
        model.pretrained = (np.asarray(user_emb, np.float32), np.asarray(item_emb, np.float32))
        if item_group is not None:
            model.item_group = np.asarray(item_group, dtype=np.int64)
        return model

    @classmethod
    def from_run(cls, run: str | Path, config: PretrainConfig | None = None,
                 rule: RuleConfig | None = None) -> Rule:
        """Reuse a run's stage 1: RUN/pretrain embeddings and RUN/partition.npz item groups
        (PEEL's popularity groups), and its stage-1 time as RULE's training time."""
        from peel.io import load_npz

        run = Path(run)
        partition = run / "partition.npz"
        groups = load_npz(partition)["item_group"] if partition.exists() else None
        model = cls.from_embeddings(*load_embeddings(run / "pretrain"), config, rule, groups)
        log = run / "pretrain" / "pretrain_log.json"
        history = read_json(log).get("history", []) if log.exists() else []
        model.stage1_seconds = float(history[-1].get("elapsed", 0.0)) if history else 0.0
        return model

    # ----------------------------------------------------------------- stage 1

    def _stage1(self, data: InteractionData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.pretrained is None:
            t0 = time.perf_counter()
            result = pretrain(data, self.config, progress=False)
            self.stage1_seconds = time.perf_counter() - t0
            self.pretrained = (result.user_emb, result.item_emb)
        user_emb, item_emb = self.pretrained
        if item_emb.shape[0] != data.n_items or user_emb.shape[0] != data.n_users:
            raise ValueError(f"rule: the pretrained tables are {user_emb.shape[0]} users x "
                             f"{item_emb.shape[0]} items but the data has {data.n_users} x "
                             f"{data.n_items}")
        if self.item_group is None:
            groups = GroupConfig(n_item_groups=self.rule.n_item_groups)
            self.item_group = make_item_groups(data.item_popularity, groups, self.seed)
        if self.item_group.shape != (data.n_items,):
            raise ValueError(f"rule: the item partition has {len(self.item_group)} items but "
                             f"the data has {data.n_items}")
        return user_emb, item_emb, self.item_group

    # ----------------------------------------------------------------- fit

    def fit(self, data: InteractionData, budget_bytes: int) -> Rule:
        cfg = self.rule
        user_emb, item_emb, item_group = self._stage1(data)
        d = self.config.block_dim
        if item_emb.shape[1] % d:
            raise ValueError(f"rule: embedding width {item_emb.shape[1]} is not a multiple of "
                             f"block_dim={d}")
        n_groups = int(item_group.max()) + 1
        scale = cfg.scale or DEFAULT_SCALE
        budgeter = Budgeter(item_group, n_groups, item_emb.shape[1] // d, d, scale)
        budgeter.check_minimum(budget_bytes)
        rng = np.random.default_rng([self.seed, budget_bytes])
        torch_seed = int(rng.integers(2**62))

        t0 = time.perf_counter()
        users = pick_eval_users(data, cfg.eval_users, self.seed)
        labeller = ValidationLabeller(data, user_emb, item_emb, item_group, d, users, cfg.k,
                                      scale)
        masks = np.stack([random_config(rng, budgeter, budget_bytes,
                                        fill=bool(rng.random() < cfg.full_share))
                          for _ in range(cfg.n_configs)])
        labels = np.array([labeller.recall(m) for m in masks])
        t1 = time.perf_counter()
        n_test = max(2, round(cfg.holdout * len(masks)))
        held = rng.permutation(len(masks))
        test, train = held[:n_test], held[n_test:]
        estimator = Estimator(cfg, n_groups * budgeter.shape[1], torch_seed)
        estimator.fit(masks[train], labels[train])
        rho = spearman(estimator.predict(masks[test]), labels[test])
        t2 = time.perf_counter()

        evolution = regularized_evolution(
            fitness=lambda m: float(estimator.predict(m[None])[0]),
            init=lambda: random_config(rng, budgeter, budget_bytes, fill=True),
            mutation=lambda m: mutate(m, rng, budgeter, budget_bytes),
            rng=rng, population=cfg.population, cycles=cfg.cycles, sample=cfg.sample)
        mask = evolution.best
        with tempfile.TemporaryDirectory(prefix="peel-rule-") as tmp:
            package = write_rule_package(Path(tmp) / "rule.peel", item_emb, item_group, mask,
                                         budgeter, budget_bytes)
        t3 = time.perf_counter()

        self.package, self.mask, self.data = package, mask, data
        self.user_emb, self.item_emb = user_emb, item_emb
        self.bytes_used = package.report.total
        self.params = {
            "n_item_groups": n_groups, "blocks_kept": int(mask.sum()),
            "blocks_per_group": mask.sum(axis=1).tolist(),
            "configs_labelled": len(masks), "configs_held_back": int(n_test),
            "eval_users": len(users), "estimator_spearman": rho,
            "predicted_recall@20": evolution.best_fitness,
            "winner_valid_recall@20": labeller.recall(mask),
            "best_labelled_valid_recall@20": float(labels.max()),
            "stage1_seconds": self.stage1_seconds, "label_seconds": t1 - t0,
            "estimator_seconds": t2 - t1, "search_seconds": t3 - t2,
            "deploy_seconds": t3 - t0, "scale": scale,
            "rule_config": {k: v for k, v in asdict(cfg).items() if k != "seed"},
        }
        return self

    # ----------------------------------------------------------------- ranking (device runtime)

    def _deployed(self) -> tuple[Package, np.ndarray, InteractionData]:
        if self.package is None or self.user_emb is None or self.data is None:
            raise ValueError("RULE: call fit(data, budget_bytes) first")
        return self.package, self.user_emb, self.data

    def scorer(self) -> Scorer:
        """Eq. 10 scores from the package runtime, for :func:`peel.eval.evaluate`."""
        package, user_emb, _ = self._deployed()
        return lambda users: package.scores(user_emb[np.asarray(users, dtype=np.int64)])

    def scores(self, users: np.ndarray) -> np.ndarray:
        package, user_emb, data = self._deployed()
        users = np.asarray(users, dtype=np.int64)
        out = np.ascontiguousarray(package.scores(user_emb[users]), dtype=np.float32)
        seen = data.train[users]
        out[np.repeat(np.arange(len(users)), np.diff(seen.indptr)), seen.indices] = -np.inf
        return out

    def rank(self, users: np.ndarray, k: int = 20, split: str = "test") -> np.ndarray:
        package, user_emb, data = self._deployed()
        users = np.asarray(users, dtype=np.int64)
        seen = data.seen_matrix(split)[users]
        ranked = package.rank_batch(user_emb[users], k=k, exclude_indptr=seen.indptr,
                                    exclude_indices=seen.indices)
        return ranked.items


__all__ = ["NFM", "Budgeter", "Estimator", "Evolution", "Rule", "RuleConfig",
           "ValidationLabeller", "mutate", "pick_eval_users", "random_config",
           "regularized_evolution", "selection_of", "spearman", "write_rule_package"]
