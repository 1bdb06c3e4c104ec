"""What DLRM-CE and LightRec share: BPR-MF over a compressed item table, ranked on the device.

Both methods keep full d-dim user vectors and replace the |V| x d item table by something
smaller that still yields one d-vector per item (two shared tables; codebooks + codes). Why a
matrix-factorisation backbone and not LightGCN: a graph backbone ranks with *propagated* item
vectors, a dense |V| x d table computed from the whole graph, which a device would have to
store and which is exactly what the compression removes. So the compressed vectors are the
final item vectors, scored by the dot product, and trained with stage 1's BPR recipe
(:mod:`peel.pretrain`: Adam, the learning-rate half-life, uniform or hard (DNS) negatives,
early stopping on validation Recall@20).

:func:`train_bpr` is that trainer for any :class:`ItemModel`; :class:`CompressedRecommender`
is the baseline interface over it, whose ``scores`` / ``rank`` go through the numpy-only
functions of :mod:`peel.device_compressed` (what a phone runs), so the reported figures are
the device's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from peel import device_compressed as dc
from peel.baselines.base import EmbeddingRecommender
from peel.data import InteractionData
from peel.eval import Scorer, dot_scorer, evaluate, selection_recall
from peel.executor import deterministic_torch
from peel.pretrain import (
    NegativeSampler,
    PretrainConfig,
    _hardest,
    bpr_loss,
    learning_rate,
    resolve_device,
)

log = logging.getLogger(__name__)

#: Users scored per call of the device functions when a whole split is ranked.
RANK_BATCH = 512


class ItemModel(torch.nn.Module):
    """Item vectors computed from compressed parameters (the part each method defines)."""

    n_items: int
    dim: int

    def vectors(self, items: torch.Tensor) -> torch.Tensor:
        """Differentiable (len(items), d) vectors of ``items`` for the training loss."""
        raise NotImplementedError

    def table(self) -> torch.Tensor:
        """Every item's vector as the device would compute it (no gradient)."""
        raise NotImplementedError

    def candidate_table(self) -> torch.Tensor:
        """Vectors that rank hard-negative candidates; the current table by default."""
        return self.table()

    def aux_loss(self, items: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor | None:
        """An extra training term on the batch's items (e.g. distillation), or None."""
        return None

    def start_epoch(self) -> None:
        """Hook before each epoch (e.g. refresh a cached table)."""

    def device_arrays(self) -> dict[str, np.ndarray]:
        """What a device stores for the items, as numpy arrays."""
        raise NotImplementedError


@dataclass
class BPRResult:
    """The best (validation Recall@20) user vectors and item arrays, and how they were found."""

    user_emb: np.ndarray
    arrays: dict[str, np.ndarray]
    best_epoch: int
    valid_metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def train_bpr(data: InteractionData, cfg: PretrainConfig, items: ItemModel,
              user_init: np.ndarray | None = None) -> BPRResult:
    """BPR over ``items`` with stage 1's optimiser, sampling and early stopping.

    Epoch 0 (before any step) is validated too, so a model that starts from a teacher keeps
    its start when training does not improve it. Every epoch draws from ``(seed, epoch)``.
    """
    with deterministic_torch():
        return _train_bpr(data, cfg, items, user_init)


def _train_bpr(data: InteractionData, cfg: PretrainConfig, items: ItemModel,
               user_init: np.ndarray | None) -> BPRResult:
    cfg.validate()
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    dim = items.dim
    if user_init is None:
        users0 = torch.randn(data.n_users, dim, generator=gen) * cfg.init_std
    else:
        users0 = torch.from_numpy(np.array(user_init, dtype=np.float32))
    user = torch.nn.Parameter(users0.to(device))
    items.to(device)
    opt = torch.optim.Adam([user, *items.parameters()], lr=cfg.lr)
    sampler = NegativeSampler(data.train)
    coo = data.train.tocoo()
    pos_u, pos_i = coo.row.astype(np.int64), coo.col.astype(np.int64)
    history: list[dict[str, Any]] = []
    best: tuple[float, int, np.ndarray, dict[str, np.ndarray], dict[str, float]] | None = None
    bad = 0
    step = 0
    for epoch in range(cfg.epochs + 1):
        record: dict[str, Any] = {"epoch": epoch}
        if epoch > 0:
            t0 = time.perf_counter()
            record["loss"], step = _epoch(user, items, opt, sampler, pos_u, pos_i, cfg,
                                          epoch - 1, step, device)
            record["seconds"] = time.perf_counter() - t0
        if data.valid.nnz and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            u_np = user.detach().cpu().numpy().astype(np.float32, copy=True)
            with torch.no_grad():
                table = items.table().detach()
            # scored where it was trained (a GPU ranks the validation users there)
            metrics = evaluate(dot_scorer(user.detach(), table), data, "valid",
                               batch_size=cfg.eval_batch_size).metrics
            record["valid"] = metrics
            if best is None or selection_recall(metrics) > best[0]:
                best = (selection_recall(metrics), epoch, u_np, items.device_arrays(), metrics)
                bad = 0
            else:
                bad += 1
        history.append(record)
        log.info("epoch %d loss %s valid R@20 %s (%.0f s)", epoch, record.get("loss"),
                 record.get("valid", {}).get("recall@20"), time.perf_counter() - t_start)
        over_time = (cfg.max_minutes is not None
                     and time.perf_counter() - t_start > 60 * cfg.max_minutes)
        if bad >= cfg.patience or over_time:
            break
    if best is None:  # no validation split: the last state
        u_np = user.detach().cpu().numpy().astype(np.float32, copy=True)
        best = (0.0, len(history) - 1, u_np, items.device_arrays(), {})
    return BPRResult(best[2], best[3], best[1], best[4], history,
                     time.perf_counter() - t_start)


def _epoch(user: torch.nn.Parameter, items: ItemModel, opt: torch.optim.Optimizer,
           sampler: NegativeSampler, pos_u: np.ndarray, pos_i: np.ndarray,
           cfg: PretrainConfig, epoch: int, step: int, device: torch.device
           ) -> tuple[float, int]:
    rng = np.random.default_rng([cfg.seed, epoch])
    order = rng.permutation(len(pos_u))
    draws = cfg.negatives * (cfg.dns_candidates if cfg.sampling == "dns" else 1)
    items.start_epoch()
    total, steps = 0.0, 0
    for start in range(0, len(order), cfg.batch_size):
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        idx = order[start: start + cfg.batch_size]
        u = torch.from_numpy(pos_u[idx]).to(device)
        p = torch.from_numpy(pos_i[idx]).to(device)
        n = torch.from_numpy(sampler.sample(pos_u[idx], draws, rng)).to(device)
        eu = user[u]
        if cfg.sampling == "dns":
            with torch.no_grad():
                n = _hardest(eu.detach(), items.candidate_table(), n, cfg.negatives)
        batch = torch.cat([p, n.reshape(-1)])
        uniq, inverse = torch.unique(batch, return_inverse=True)
        vec = items.vectors(uniq)
        pv = vec[inverse[: len(p)]]
        nv = vec[inverse[len(p):]].reshape(len(p), cfg.negatives, -1)
        loss = bpr_loss((eu * pv).sum(-1), torch.einsum("bd,bkd->bk", eu, nv))
        reg = eu.pow(2).sum() + pv.pow(2).sum() + nv.pow(2).sum() / cfg.negatives
        loss = loss + cfg.l2 * 0.5 * reg / len(p)
        aux = items.aux_loss(uniq, vec)
        if aux is not None:
            loss = loss + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach())
        steps += 1
        step += 1
    return total / max(steps, 1), step


class CompressedRecommender(EmbeddingRecommender):
    """A baseline that stores user vectors and compressed item arrays, ranked on the device.

    Subclasses set ``user_emb``, ``arrays``, ``data``, ``bytes_used`` and ``params`` in
    ``fit`` and implement :meth:`device_scores` with :mod:`peel.device_compressed`.
    """

    #: Candidates of :class:`PretrainConfig` fields (field name -> values) for the shared
    #: validation tuner; without one, ``fit`` uses the config it was given.
    search_space: ClassVar[dict[str, tuple]] = {}

    def __init__(self, config: PretrainConfig | None = None) -> None:
        super().__init__(config)
        self.arrays: dict[str, np.ndarray] = {}

    def device_scores(self, user_vectors: np.ndarray) -> np.ndarray:
        """(n, |V|) scores the device computes for these user vectors."""
        raise NotImplementedError

    def _ready(self) -> tuple[np.ndarray, InteractionData]:
        if self.user_emb is None or self.data is None or not self.arrays:
            raise ValueError(f"{self.label}: call fit(data, budget_bytes) first")
        return self.user_emb, self.data

    def item_table(self) -> np.ndarray:
        """The |V| x d table the arrays represent (for analysis; the device never builds it)."""
        raise NotImplementedError

    def scorer(self) -> Scorer:
        """Device scores for :func:`peel.eval.evaluate` (it does the masking)."""
        user, _ = self._ready()
        return lambda users: self.device_scores(user[np.asarray(users, dtype=np.int64)])

    def scores(self, users: np.ndarray) -> np.ndarray:
        user, data = self._ready()
        users = np.asarray(users, dtype=np.int64)
        out = self.device_scores(user[users])
        seen = data.train[users]
        out[np.repeat(np.arange(len(users)), np.diff(seen.indptr)), seen.indices] = -np.inf
        return out

    def rank(self, users: np.ndarray, k: int = 20, split: str = "test") -> np.ndarray:
        user, data = self._ready()
        users = np.asarray(users, dtype=np.int64)
        seen = data.seen_matrix(split)[users]
        parts = []
        for start in range(0, len(users), RANK_BATCH):
            rows = slice(start, start + RANK_BATCH)
            ex = seen[rows]
            parts.append(dc.top_k(self.device_scores(user[users[rows]]), k, ex.indptr,
                                  ex.indices))
        return np.concatenate(parts) if parts else np.zeros((0, k), dtype=np.int64)

