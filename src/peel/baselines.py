"""Fixed-size baselines of the paper's Table III (PMF and LightGCN) under a memory budget.

A fixed-size model has one embedding size for every item, so under a budget M it is retrained
at the largest size D' whose item table plus one user embedding fits: (|V| + 1) * D' * 4 <= M.
It ranks by dot product and is evaluated with exactly the metrics PEEL is evaluated with.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from peel.data import InteractionData
from peel.eval import dot_scorer, evaluate
from peel.pretrain import PretrainConfig, PretrainResult, pretrain

FLOAT_BYTES = 4
METHODS = {"pmf": 0, "lightgcn": None}  # layers: PMF is BPR-MF (0 layers); LightGCN as given


def fixed_size_dim(budget_bytes: int, n_items: int) -> int:
    """Largest embedding size whose item table plus one user vector fits the budget."""
    dim = budget_bytes // ((n_items + 1) * FLOAT_BYTES)
    if dim < 1:
        need = (n_items + 1) * FLOAT_BYTES
        raise ValueError(f"budget {budget_bytes} B cannot hold even a 1-d item table"
                         f" ({need} B needed)")
    return int(dim)


@dataclass
class BaselineResult:
    method: str
    budget_bytes: int
    dim: int
    bytes_used: int
    test: dict[str, float]
    valid: dict[str, float]
    best_epoch: int
    seconds: float


def baseline_config(method: str, dim: int, base: PretrainConfig) -> PretrainConfig:
    """The pretraining config retargeted to one baseline: one block (no block structure), no
    diversity term, 0 layers for PMF."""
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; expected one of {sorted(METHODS)}")
    layers = METHODS[method]
    return replace(base, dim=dim, block_dim=dim, diversity=0.0,
                   layers=base.layers if layers is None else layers)


def train_baseline(data: InteractionData, method: str, budget_bytes: int,
                   base: PretrainConfig, progress: bool = False) -> BaselineResult:
    import time

    dim = fixed_size_dim(budget_bytes, data.n_items)
    cfg = baseline_config(method, dim, base)
    t0 = time.perf_counter()
    result: PretrainResult = pretrain(data, cfg, progress=progress)
    seconds = time.perf_counter() - t0
    scorer = dot_scorer(result.user_emb, result.item_emb)
    test = evaluate(scorer, data, "test").metrics
    return BaselineResult(method, budget_bytes, dim, (data.n_items + 1) * dim * FLOAT_BYTES,
                          test, result.valid_metrics, result.best_epoch, seconds)


def dims_for_budgets(budgets: list[int], n_items: int) -> np.ndarray:
    return np.array([fixed_size_dim(b, n_items) for b in budgets])
