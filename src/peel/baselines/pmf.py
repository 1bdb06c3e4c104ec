"""PMF: probabilistic matrix factorisation (Salakhutdinov & Mnih, 2007; the paper's ref. [70]).

The model is r_ui ~ N(u_u . v_i, sigma^2) with zero-mean Gaussian priors on every user and item
vector, so its MAP estimate minimises

    sum over observed (u, i) of  1/2 (r_ui - u_u . v_i)^2 + l2/2 (||u_u||^2 + ||v_i||^2).

The data here is implicit (a user has an item or not), so, as is usual for PMF on implicit
feedback, the observed entries are the training interactions with target 1 plus, for each of
them, ``negatives`` unobserved entries drawn uniformly at random (never one of the user's
training items) with target 0: ``negatives`` is the stated negative ratio. Training is the
paper's SGD form of the objective (each sampled entry contributes its squared error and the
prior on its two rows), mini-batched with Adam, and stops early on validation Recall@20 like
every other method here. No biases, no propagation, no pairwise loss: that is what separates it
from :class:`peel.baselines.bpr_mf.BPRMF`. The size is the fixed-size baselines' largest
D' = M // ((|V| + 1) * 4).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from peel.baselines.base import (
    EmbeddingRecommender,
    baseline_config,
    fixed_size_bytes,
    fixed_size_dim,
)
from peel.data import InteractionData
from peel.eval import evaluate, selection_recall
from peel.executor import deterministic_torch
from peel.pretrain import (
    Model,
    NegativeSampler,
    PretrainConfig,
    device_scorer,
    learning_rate,
    resolve_device,
)


@dataclass
class PMFResult:
    """Best (validation Recall@20) factors and the per-epoch log."""

    user_emb: np.ndarray
    item_emb: np.ndarray
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)


def pmf_loss(model: Model, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
             l2: float) -> torch.Tensor:
    """Squared error of every sampled entry plus its rows' Gaussian priors, per positive.

    ``neg`` is (batch, ratio): the unobserved entries sampled for each positive (target 0).
    """
    u = model.user[users]
    vp, vn = model.item[pos], model.item[neg]
    err_pos = (1.0 - (u * vp).sum(-1)).pow(2).sum()
    err_neg = torch.einsum("bd,bkd->bk", u, vn).pow(2).sum()
    ratio = neg.shape[1]
    prior = ((1 + ratio) * u.pow(2).sum() + vp.pow(2).sum() + vn.pow(2).sum())
    return 0.5 * (err_pos + err_neg + l2 * prior) / len(users)


def train_pmf(data: InteractionData, cfg: PretrainConfig) -> PMFResult:
    """Fit PMF with ``cfg``'s dim, lr (and half-life), l2, negatives (ratio), batch_size,
    epochs, patience, eval_every, init_std, seed; keep the best validation Recall@20."""
    cfg.validate()
    with deterministic_torch():
        return _train(data, cfg)


def _train(data: InteractionData, cfg: PretrainConfig) -> PMFResult:
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = Model(data.n_users, data.n_items, cfg.dim, cfg.init_std, gen).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sampler = NegativeSampler(data.train)
    coo = data.train.tocoo()
    pos_u, pos_i = coo.row.astype(np.int64), coo.col.astype(np.int64)
    has_valid = data.valid.nnz > 0
    best: tuple[np.ndarray, np.ndarray] | None = None
    best_recall, best_epoch, bad = -1.0, -1, 0
    history: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for epoch in range(cfg.epochs):
        loss = _epoch(model, opt, sampler, pos_u, pos_i, cfg, epoch, device)
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": loss}
        if has_valid and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            emb = _numpy(model)
            metrics = evaluate(device_scorer(*emb, device), data, "valid",
                               batch_size=cfg.eval_batch_size).metrics
            record["valid"] = metrics
            if selection_recall(metrics) > best_recall:
                best_recall, best_epoch, bad, best = selection_recall(metrics), epoch + 1, 0, emb
            else:
                bad += 1
        history.append(record)
        out_of_time = (cfg.max_minutes is not None
                       and time.perf_counter() - t_start > 60 * cfg.max_minutes)
        if bad >= cfg.patience or out_of_time:
            break
    if best is None:  # no validation split: the last epoch
        best, best_epoch = _numpy(model), len(history)
    return PMFResult(best[0], best[1], best_epoch, history)


def _epoch(model: Model, opt: torch.optim.Optimizer, sampler: NegativeSampler,
           pos_u: np.ndarray, pos_i: np.ndarray, cfg: PretrainConfig, epoch: int,
           device: torch.device) -> float:
    rng = np.random.default_rng([cfg.seed, epoch])
    order = rng.permutation(len(pos_u))
    steps_per_epoch = -(-len(order) // cfg.batch_size)
    total, steps = 0.0, 0
    for start in range(0, len(order), cfg.batch_size):
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, epoch * steps_per_epoch + steps)
        idx = order[start : start + cfg.batch_size]
        neg = sampler.sample(pos_u[idx], cfg.negatives, rng)
        loss = pmf_loss(model, torch.from_numpy(pos_u[idx]).to(device),
                        torch.from_numpy(pos_i[idx]).to(device),
                        torch.from_numpy(neg).to(device), cfg.l2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach())
        steps += 1
    return total / max(steps, 1)


def _numpy(model: Model) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        return (model.user.detach().cpu().numpy().astype(np.float32, copy=True),
                model.item.detach().cpu().numpy().astype(np.float32, copy=True))


class PMF(EmbeddingRecommender):
    """Probabilistic matrix factorisation, retrained at D' = M // ((|V| + 1) * 4) per budget.

    Uses the config's lr, lr_half_life, l2 (the Gaussian priors' weight), negatives (sampled
    zeros per observed entry), batch_size, epochs, patience and seed; stage 1's layers, DNS
    and diversity settings do not apply.
    """

    name: ClassVar[str] = "pmf"
    label: ClassVar[str] = "PMF"
    search_space: ClassVar[dict[str, tuple]] = {
        "lr": (3e-3, 1e-2, 3e-2),
        "l2": (1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
        "negatives": (1, 2, 4, 8),
    }

    def fit(self, data: InteractionData, budget_bytes: int) -> PMF:
        dim = fixed_size_dim(budget_bytes, data.n_items)
        cfg = baseline_config(self.name, dim, self.config, layers=0)
        t0 = time.perf_counter()
        result = train_pmf(data, cfg)
        self.user_emb, self.item_emb, self.data = result.user_emb, result.item_emb, data
        self.bytes_used = fixed_size_bytes(dim, data.n_items)
        self.params = {"dim": dim, "negatives": cfg.negatives, "l2": cfg.l2, "lr": cfg.lr,
                       "best_epoch": result.best_epoch, "epochs_run": len(result.history),
                       "seconds": time.perf_counter() - t0}
        return self
