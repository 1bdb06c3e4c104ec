"""One contract for every method of the comparison (PEEL and each registered baseline).

Like implicit's RecommenderBaseMixin: every method is fitted to the same tiny planted data under
the same byte budget and must keep the same promises. A new baseline registered in
``peel.baselines.REGISTRY`` must add a small configuration to ``CONFIGS`` (the first test says
so), and is then checked like the others.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from peel.api import PEELRecommender
from peel.baselines import (
    REGISTRY,
    BudgetedRecommender,
    Rule,
    RuleConfig,
    fixed_size_bytes,
    fixed_size_dim,
)
from peel.budget import full_table_bytes
from peel.data import DataConfig, InteractionData, from_interactions
from peel.eval import metrics_from_topk
from peel.overrides import apply_overrides
from peel.pipeline import RunConfig
from peel.pretrain import PretrainConfig

SMALL_PRETRAIN = PretrainConfig(dim=16, block_dim=8, layers=1, epochs=8, batch_size=1024,
                                lr=2e-2, patience=3, sampling="uniform", lr_half_life=0,
                                diversity=0.0, seed=3)
SMALL_RUN = apply_overrides(RunConfig(), [
    "run.workers=1", "run.seed=3", "data.seed=3",
    "pretrain.dim=16", "pretrain.layers=1", "pretrain.epochs=8", "pretrain.batch_size=1024",
    "pretrain.lr=0.02", "pretrain.patience=3", "pretrain.sampling=uniform",
    "pretrain.lr_half_life=0", "pretrain.seed=3",
    "groups.n_user_groups=2", "groups.n_item_groups=3",
    "finetune.n_blocks=2", "finetune.block_dim=8", "finetune.max_epochs=2",
    "finetune.patience=1", "finetune.eval_users=60"])

#: method name -> a factory of a freshly configured, small instance
CONFIGS: dict[str, Any] = {
    "peel": lambda: PEELRecommender(SMALL_RUN),
    **{name: (lambda cls=cls: cls(SMALL_PRETRAIN)) for name, cls in REGISTRY.items()},
    # RULE pretrains like lightgcn-svd here (inside `peel evaluate` it reuses the run's stage 1)
    "rule": lambda: Rule(SMALL_PRETRAIN, RuleConfig(n_configs=200, eval_users=100)),
}
K = 10


def planted(seed: int = 0, n_users: int = 150, n_items: int = 60,
            communities: int = 3) -> InteractionData:
    """Users of community c draw 12 items from pool c (popular within the pool), plus one
    stray item, so the most popular items overall serve only a third of the users."""
    rng = np.random.default_rng(seed)
    pools = np.array_split(rng.permutation(n_items), communities)
    users, items = [], []
    for u in range(n_users):
        pool = pools[u % communities]
        weights = 1.0 / np.arange(1, len(pool) + 1)
        picked = rng.choice(pool, 12, replace=False, p=weights / weights.sum())
        stray = rng.integers(n_items)
        for i in {*picked.tolist(), int(stray)}:
            users.append(u)
            items.append(i)
    return from_interactions(users, items, DataConfig(seed=seed), name="planted")


@pytest.fixture(scope="module")
def data() -> InteractionData:
    return planted()


@pytest.fixture(scope="module")
def budget(data: InteractionData) -> int:
    return full_table_bytes(data.n_items, 16) // 2 + 2048  # room for PEEL's package header


@pytest.fixture(scope="module")
def fitted(data: InteractionData, budget: int) -> dict[str, tuple[Any, Any]]:
    """Every method fitted twice with the same seed (determinism is part of the contract)."""
    return {name: (make().fit(data, budget), make().fit(data, budget))
            for name, make in CONFIGS.items()}


def test_every_registered_method_is_covered() -> None:
    assert set(CONFIGS) == {"peel", *REGISTRY}
    assert {"pmf", "bpr-mf", "lightgcn", "lightgcn-svd", "lightgcn-fp16", "lightgcn-int8",
            "dlrm-ce", "lightrec", "rule"} <= set(REGISTRY)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_contract(name: str, fitted: dict[str, tuple[Any, Any]], data: InteractionData,
                  budget: int) -> None:
    model, again = fitted[name]
    assert isinstance(model, BudgetedRecommender)
    assert model.name == name and model.label and isinstance(model.params, dict)
    # never over budget, to the byte
    assert 0 < model.bytes_used <= budget
    users = np.flatnonzero(data.test.getnnz(axis=1) > 0)
    # seen items are excluded: scores put training items at -inf, rankings skip train + valid
    scores = model.scores(users)
    assert scores.shape == (len(users), data.n_items)
    train = data.train[users]
    assert np.all(scores[train.nonzero()] == -np.inf)
    ranked = model.rank(users, k=K, split="test")
    assert ranked.shape == (len(users), K)
    seen = data.seen_matrix("test")[users]
    for row, items in enumerate(ranked):
        assert not set(items.tolist()) & set(seen[row].indices.tolist())
    # beats popularity on planted communities
    recall = metrics_from_topk(ranked, users, data.test, (K,))[f"recall@{K}"].mean()
    assert recall > popularity_recall(data, users) + 0.05, (name, recall)
    # deterministic for a seed
    np.testing.assert_array_equal(ranked, again.rank(users, k=K, split="test"))
    np.testing.assert_array_equal(scores, again.scores(users))


#: Methods that store a (|V| + 1) x D' float32 table (items plus one user vector)
FIXED_SIZE = ("pmf", "bpr-mf", "lightgcn", "lightgcn-svd")


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_byte_accounting_at_three_budgets(name: str, data: InteractionData) -> None:
    """bytes_used never exceeds the budget; for the fixed-size models it is exactly the
    formula (|V| + 1) * D' * 4 with D' the largest size that fits (capped at lightgcn-svd's
    pretrained width)."""
    from peel.budget import BudgetError

    n = data.n_items
    full16 = (n + 1) * 16 * 4
    fitted_budgets = 0
    for budget in (full16 // 4 + 3, full16 // 2, full16 - 1):
        try:
            model = CONFIGS[name]().fit(data, budget)
        except BudgetError as err:  # a package has a floor (headers, one block per group)
            assert "minimum" in str(err), err
            continue
        fitted_budgets += 1
        assert 0 < model.bytes_used <= budget, (name, budget, model.bytes_used)
        if name in FIXED_SIZE:
            dim = min(fixed_size_dim(budget, n), model.params.get("full_dim", 10**9))
            assert model.params["dim"] == dim
            assert model.bytes_used == fixed_size_bytes(dim, n) == (n + 1) * dim * 4
    assert fitted_budgets >= 1 if name not in FIXED_SIZE else fitted_budgets == 3


def popularity_recall(data: InteractionData, users: np.ndarray) -> float:
    pop = data.item_popularity.astype(np.float64)
    seen = data.seen_matrix("test")[users]
    scores = np.tile(pop, (len(users), 1))
    scores[seen.nonzero()] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    return float(metrics_from_topk(top, users, data.test, (K,))[f"recall@{K}"].mean())
