"""The interface every method of the comparison implements, and its dot-product base.

Why one interface: a comparison is only fair when every method is fitted to the same data
under the same byte budget and ranked with the same exclusions and metrics. Each method is
one module of :mod:`peel.baselines` (PEEL's adapter is :class:`peel.api.PEELRecommender`);
one contract test runs every registered method through the same checks.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch

from peel.data import InteractionData
from peel.eval import Scorer, dot_scorer, topk_excluding
from peel.pretrain import PretrainConfig

FLOAT_BYTES = 4


@runtime_checkable
class BudgetedRecommender(Protocol):
    """A recommender fitted under a memory budget.

    ``fit(data, budget_bytes)`` trains (or adapts) the model so that what a device stores
    for one user, ``bytes_used``, never exceeds ``budget_bytes``. ``scores(users)`` are
    (len(users), n_items) with the users' training items at -inf; ``rank(users, k, split)``
    returns top-``k`` item indices excluding what the user has before ``split`` (train, plus
    valid for test). ``name`` is the method's registry name, ``label`` its name in reports,
    ``params`` the hyper-parameters it chose (e.g. the embedding size the budget allows).
    """

    name: str
    label: str
    bytes_used: int
    params: dict[str, Any]

    def fit(self, data: InteractionData, budget_bytes: int) -> BudgetedRecommender: ...

    def scores(self, users: np.ndarray) -> np.ndarray: ...

    def rank(self, users: np.ndarray, k: int = 20, split: str = "test") -> np.ndarray: ...


def fixed_size_dim(budget_bytes: int, n_items: int) -> int:
    """Largest embedding size whose item table plus one user vector fits the budget:
    (|V| + 1) * D' * 4 <= M."""
    dim = budget_bytes // ((n_items + 1) * FLOAT_BYTES)
    if dim < 1:
        need = (n_items + 1) * FLOAT_BYTES
        raise ValueError(f"budget {budget_bytes} B cannot hold even a 1-d item table"
                         f" ({need} B needed)")
    return int(dim)


def fixed_size_bytes(dim: int, n_items: int) -> int:
    """What a device stores for a fixed-size model: the item table and one user vector."""
    return (n_items + 1) * dim * FLOAT_BYTES


def dims_for_budgets(budgets: list[int], n_items: int) -> np.ndarray:
    return np.array([fixed_size_dim(b, n_items) for b in budgets])


def baseline_config(method: str, dim: int, base: PretrainConfig,
                    layers: int | None = None) -> PretrainConfig:
    """Stage 1's config retargeted to one fixed-size baseline: one block (no block
    structure), no diversity term, no nested prefixes, ``layers`` (0 for the
    factorisations; None keeps the base's)."""
    return replace(base, dim=dim, block_dim=dim, diversity=0.0, nested_dims=(),
                   layers=base.layers if layers is None else layers)


class EmbeddingRecommender:
    """A model that ranks by the dot product of a user and an item table."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    #: PretrainConfig field -> the values :func:`peel.tuning.tune` may draw for it. Empty (the
    #: default) means the method has nothing to tune: only its configured setting is fitted.
    search_space: ClassVar[dict[str, tuple]] = {}

    def __init__(self, config: PretrainConfig | None = None) -> None:
        self.config = config or PretrainConfig()
        self.user_emb: np.ndarray | None = None
        self.item_emb: np.ndarray | None = None
        self.data: InteractionData | None = None
        self.bytes_used = 0
        self.params: dict[str, Any] = {}

    def _fitted(self) -> tuple[np.ndarray, np.ndarray, InteractionData]:
        if self.user_emb is None or self.item_emb is None or self.data is None:
            raise ValueError(f"{self.label or type(self).__name__}: call fit(data, "
                             "budget_bytes) first")
        return self.user_emb, self.item_emb, self.data

    def scorer(self) -> Scorer:
        """Raw dot-product scores for :func:`peel.eval.evaluate` (it does the masking)."""
        user, item, _ = self._fitted()
        return dot_scorer(user, item)

    def scores(self, users: np.ndarray) -> np.ndarray:
        user, item, data = self._fitted()
        users = np.asarray(users, dtype=np.int64)
        out = (user[users] @ item.T).astype(np.float32)
        seen = data.train[users]
        rows = np.repeat(np.arange(len(users)), np.diff(seen.indptr))
        out[rows, seen.indices] = -np.inf
        return out

    def rank(self, users: np.ndarray, k: int = 20, split: str = "test") -> np.ndarray:
        user, item, data = self._fitted()
        users = np.asarray(users, dtype=np.int64)
        scores = torch.from_numpy(np.ascontiguousarray(user[users] @ item.T, dtype=np.float32))
        return topk_excluding(scores, data.seen_matrix(split)[users], k)
