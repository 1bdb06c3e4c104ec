"""Full-ranking top-K evaluation: Recall@K and NDCG@K over all items.

Definitions follow the LightGCN reference code, which is what the paper's numbers and our users'
comparisons use: recall = hits in the top K / number of the user's held-out items; NDCG's ideal
DCG is computed over min(|held-out|, K) positions (not over the ranked list, which would inflate
it). Items the user already has (train, plus valid when testing) are excluded from the ranking.
Averages are over users with at least one held-out item.

Two entry points share one metric kernel so that server-side scoring and the device runtime's
own rankings are measured identically:

* :func:`evaluate` takes any scorer (users -> scores over all items) and ranks in user batches.
* :func:`metrics_from_topk` takes already-ranked item lists, e.g. from ``peel.device``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from peel.data import InteractionData

Scorer = Callable[[np.ndarray], "np.ndarray | torch.Tensor"]


@dataclass
class EvalResult:
    """Mean metrics plus the per-user values behind them (for significance tests)."""

    metrics: dict[str, float]
    users: np.ndarray
    per_user: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    def __getitem__(self, key: str) -> float:
        return self.metrics[key]


#: The paper's cutoffs (Recall/NDCG@20 and @50).
CUTOFFS = (20, 50)


def metric_cutoffs(k: int, cutoffs: Sequence[int] = CUTOFFS) -> tuple[int, ...]:
    """The cutoffs a ranked list of ``k`` items supports: the standard ones <= k, and k.

    Why: with ``[deploy] k = 20`` or a catalogue of 30 items there is no top-50 list, and
    asking for one used to fail instead of reporting what the lists can measure.
    """
    if isinstance(k, bool) or int(k) < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return tuple(sorted({int(c) for c in cutoffs if c <= k} | {int(k)}))


def selection_recall(metrics: dict[str, float]) -> float:
    """Recall@20 (what early stopping compares), or the smallest cutoff's on tiny catalogues."""
    if "recall@20" in metrics:
        return metrics["recall@20"]
    return min(((int(key.split("@")[1]), v) for key, v in metrics.items()
                if key.startswith("recall@")))[1]


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def hit_matrix(topk: np.ndarray, users: np.ndarray, truth: sp.csr_matrix) -> np.ndarray:
    """Boolean (len(users), K): is the item at each rank among the user's held-out items.

    Negative entries (the device runtime pads lists shorter than K with -1) are never hits;
    encoded naively, -1 would collide with the previous user's last item.
    """
    rows = truth[users]
    n_items = truth.shape[1]
    # Encode (row, item) pairs as one sorted int64 key and test membership by binary search.
    row_of = np.repeat(np.arange(len(users), dtype=np.int64), np.diff(rows.indptr))
    keys = np.sort(row_of * n_items + rows.indices.astype(np.int64))
    query = np.arange(len(users), dtype=np.int64)[:, None] * n_items + topk.astype(np.int64)
    pos = np.searchsorted(keys, query)
    pos = np.minimum(pos, max(len(keys) - 1, 0))
    if len(keys) == 0:
        return np.zeros(topk.shape, dtype=bool)
    return (keys[pos] == query) & (topk >= 0)


def metrics_from_hits(hits: np.ndarray, n_truth: np.ndarray,
                      ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-user recall/NDCG at each K from a (users, max K) hit matrix."""
    disc = _discounts(hits.shape[1])
    ideal_cum = np.concatenate([[0.0], np.cumsum(disc)])
    dcg_cum = np.cumsum(hits * disc, axis=1)
    hit_cum = np.cumsum(hits, axis=1)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        n_hits = hit_cum[:, k - 1]
        out[f"recall@{k}"] = n_hits / n_truth
        idcg = ideal_cum[np.minimum(n_truth, k)]
        out[f"ndcg@{k}"] = dcg_cum[:, k - 1] / idcg
    return out


def metrics_from_topk(topk: np.ndarray, users: np.ndarray, truth: sp.csr_matrix,
                      ks: Sequence[int] = (20, 50)) -> dict[str, np.ndarray]:
    """Per-user metrics for ranked lists ``topk`` (len(users) x >= max(ks)) of ``users``."""
    ks = _check_ks(ks, topk.shape[1])
    n_truth = truth.getnnz(axis=1)[users].astype(np.int64)
    if (n_truth == 0).any():
        raise ValueError("metrics_from_topk: every user needs at least one held-out item")
    hits = hit_matrix(topk[:, : max(ks)], users, truth)
    return metrics_from_hits(hits, n_truth, ks)


def _check_ks(ks: Sequence[int], available: int | None = None) -> list[int]:
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"K values must be positive integers, got {ks}")
    if available is not None and ks[-1] > available:
        raise ValueError(f"ranked lists have {available} items but K={ks[-1]} was asked")
    return ks


def topk_excluding(scores: torch.Tensor, seen: sp.csr_matrix, k: int) -> np.ndarray:
    """Top-k item indices per row after masking each row's seen items to -inf."""
    if seen.nnz:
        rows = torch.from_numpy(np.repeat(np.arange(seen.shape[0]), np.diff(seen.indptr)))
        cols = torch.from_numpy(seen.indices.astype(np.int64))
        scores[rows.to(scores.device), cols.to(scores.device)] = -torch.inf
    k = min(k, scores.shape[1])
    return torch.topk(scores, k, dim=1, sorted=True).indices.cpu().numpy()


def evaluate(scorer: Scorer, data: InteractionData, split: str = "test",
             ks: Sequence[int] = (20, 50), batch_size: int = 1024,
             users: np.ndarray | None = None) -> EvalResult:
    """Full-ranking evaluation of ``scorer`` on ``split`` of ``data``.

    ``scorer(users)`` returns a (len(users), n_items) array or tensor; it may return a tensor it
    does not need afterwards, since it is modified in place for masking. Cutoffs beyond the
    catalogue are capped at its size (a 30-item catalogue reports @20 and @30, not @50).
    """
    ks = sorted({min(k, data.n_items) for k in _check_ks(ks)})
    truth = data.split_matrix(split)
    seen = data.seen_matrix(split)
    n_truth_all = truth.getnnz(axis=1)
    if users is None:
        users = np.flatnonzero(n_truth_all > 0)
    else:
        users = np.asarray(users, dtype=np.int64)
        users = users[n_truth_all[users] > 0]
    per_user = {f"{m}@{k}": np.empty(len(users)) for k in ks for m in ("recall", "ndcg")}
    with torch.inference_mode():
        for start in range(0, len(users), batch_size):
            batch = users[start : start + batch_size]
            scores = scorer(batch)
            scores = torch.as_tensor(scores, dtype=torch.float32)
            if scores.shape != (len(batch), data.n_items):
                raise ValueError(
                    f"scorer returned shape {tuple(scores.shape)}; expected"
                    f" ({len(batch)}, {data.n_items})"
                )
            topk = topk_excluding(scores, seen[batch], max(ks))
            batch_metrics = metrics_from_topk(topk, batch, truth, ks)
            for key, value in batch_metrics.items():
                per_user[key][start : start + len(batch)] = value
    means = {key: float(v.mean()) if len(v) else 0.0 for key, v in per_user.items()}
    return EvalResult(metrics=means, users=users, per_user=per_user)


def dot_scorer(user_emb: np.ndarray | torch.Tensor,
               item_emb: np.ndarray | torch.Tensor) -> Scorer:
    """Scorer for embedding models ranked by inner product (LightGCN, MF).

    Tables given as tensors on a GPU are scored (and then ranked by :func:`evaluate`) there.

    The score matrix is written into one reused buffer: with small embedding sizes the product
    is bound by writing its output, and fresh 100 MB allocations per batch (page faults) cost
    more than the arithmetic. The returned tensor is only valid until the next call.
    """
    u = torch.as_tensor(user_emb, dtype=torch.float32)
    it = torch.as_tensor(item_emb, dtype=torch.float32).T.contiguous()
    buffer: dict[int, torch.Tensor] = {}

    def score(users: np.ndarray) -> torch.Tensor:
        n = len(users)
        if n not in buffer:
            buffer.clear()
            buffer[n] = torch.empty(n, it.shape[1], device=it.device)
        rows = u[torch.from_numpy(np.asarray(users, dtype=np.int64)).to(u.device)]
        return torch.matmul(rows, it, out=buffer[n])

    return score


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())
