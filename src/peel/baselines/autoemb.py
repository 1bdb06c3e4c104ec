"""AutoEmb: soft selection of embedding sizes, searched DARTS-style (Zhao et al., ICDM 2021).

Every user and item has a row in every candidate size's table (2, 4, 8, 16, 64, 128 at
d = 128). Each size is lifted to d dims by its own affine map and batch norm, then tanh (the
reference's ``W_movie[i]`` and ``bn_movie``; one batch norm per size here, so that the device
can fold it into that size's map), and the entity's vector is the softmax-weighted sum of its
lifted candidates. The weights come from a small controller per side that reads the entity's
popularity (standardised log of its training interactions). Training alternates, first-order
DARTS: a step of the tables, maps and batch norms on a training batch with the weights held
fixed, then a step of the controllers on a VALIDATION batch (validation interactions, negatives
that are neither training nor validation items) with everything else held fixed.

Deployment: each item keeps only its highest-weighted size (the hard argmax); its device
vector is that size's lifted candidate. If the device's bytes (tables at the chosen
sizes, uint8 size codes, the folded maps of the sizes in use, one user vector;
:func:`peel.device_multidim.autoemb_bytes`) exceed M, items are demoted one size at a time,
those with the smallest weight on their current size first, until it fits
(:func:`demote_to_fit`); ``params["demoted_items"]`` says how many. The search itself never
sees M (as in the paper). Users are not budgeted (the device stores one user vector), so a
user's vector stays the soft mix it was trained as.

``AutoEmbOptions.deploy`` says what happens between the search and the device:

* ``"argmax"`` (the issue's literal reading): the searched tables as they are. A candidate was
  trained only as one term of a mix whose largest weight is often under one half, so alone it
  is a poor vector; on ml-1m this deploys 2-4 dims per item at every budget.
* ``"retrain"`` (DARTS's own second phase, "derive the discrete architecture, then train it"):
  the sizes are fixed at the (demoted) argmax, each item's vector is its one lifted candidate
  in training too, and the tables, maps and batch norms train again with the same loop and
  early stopping (controllers frozen). Which one is the default was decided on validation
  (``docs/paper-notes.md``, "ESAPN and AutoEmb").

Changes from the paper, shared with ESAPN (dot-product ranking with BPR on the training split
in shuffled mini-batches, early stopping on validation Recall@20 of the deployed model):
:mod:`peel.baselines.multidim` and ``docs/paper-notes.md``, "ESAPN and AutoEmb".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from peel import device_multidim as dm
from peel.baselines.multidim import (
    DEPLOY_CHUNK,
    MultiDimRecommender,
    batch_norm,
    class_tables,
    folded_bn,
    hardest_negatives,
    lifted_all,
    popularity_features,
    run_search,
    size_histogram,
    size_tables,
)
from peel.budget import BudgetError
from peel.data import InteractionData
from peel.eval import dot_scorer, evaluate, selection_recall
from peel.pretrain import NegativeSampler, PretrainConfig


@dataclass(frozen=True)
class AutoEmbOptions:
    """AutoEmb's own knobs (the reference: controller lr 1e-4 with 512 hidden units)."""

    controller_lr: float = 1e-3
    controller_hidden: int = 64
    #: "retrain" (train the fixed sizes again; the default, chosen on ml-1m's validation
    #: split: docs/results/ml-1m/multidim/deploy_valid_seed0.jsonl) or "argmax" (the searched
    #: candidates as they are, the literal reading)
    deploy: str = "retrain"

    def validate(self) -> None:
        if not self.controller_lr > 0 or self.controller_hidden < 1:
            raise ValueError("autoemb: need controller_lr > 0 and controller_hidden >= 1")
        if self.deploy not in DEPLOY_MODES:
            raise ValueError(f"autoemb deploy {self.deploy!r}: expected one of "
                             f"{', '.join(DEPLOY_MODES)}")


#: What AutoEmbOptions.deploy may be (module docstring).
DEPLOY_MODES = ("argmax", "retrain")


def demote_to_fit(levels: np.ndarray, weights: np.ndarray, sizes: tuple[int, ...],
                  budget_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower items' sizes one step at a time, smallest weight on the current size first,
    until :func:`peel.device_multidim.autoemb_bytes` fits ``budget_bytes``.

    Each pass orders the items above the smallest size by the weight of their current size
    (ties: lower index first) and demotes the shortest prefix that fits; when the whole pass is
    not enough it is applied and another pass starts. Returns (levels, demoted mask).
    """
    levels = np.asarray(levels, dtype=np.int64).copy()
    start = levels.copy()
    n_sizes = len(sizes)
    while True:
        counts = np.bincount(levels, minlength=n_sizes)
        if dm.autoemb_bytes(counts, sizes) <= budget_bytes:
            return levels, levels != start
        cand = np.flatnonzero(levels > 0)
        if not cand.size:
            raise BudgetError(f"autoemb: budget {budget_bytes} B is below the minimum "
                              f"{dm.autoemb_bytes(counts, sizes)} B (every one of "
                              f"{len(levels)} items at size {sizes[0]}, its lifting map, "
                              "one user vector)")
        w = weights[cand, levels[cand]]
        order = cand[np.lexsort((cand, w))]
        # counts after demoting each prefix of ``order``
        delta = np.zeros((len(order), n_sizes), dtype=np.int64)
        rows = np.arange(len(order))
        delta[rows, levels[order]] -= 1
        delta[rows, levels[order] - 1] += 1
        after = counts + np.cumsum(delta, axis=0)
        s = np.asarray(sizes, dtype=np.int64)
        used = after > 0
        floats = (after * s).sum(1) + (used * (s * sizes[-1] + sizes[-1])).sum(1) + sizes[-1]
        total = len(levels) + floats * dm.FLOAT_BYTES
        fits = np.flatnonzero(total <= budget_bytes)
        take = len(order) if not fits.size else int(fits[0]) + 1
        levels[order[:take]] -= 1


class Controller(torch.nn.Module):
    """popularity -> softmax weights over the candidate sizes."""

    def __init__(self, n_sizes: int, hidden: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(1, hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, n_sizes))

    def forward(self, pop: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(pop), dim=1)


class Side(torch.nn.Module):
    """One side's tables, per-size maps and batch norms, and controller."""

    def __init__(self, n: int, sizes: tuple[int, ...], counts: np.ndarray, std: float,
                 hidden: int, generator: torch.Generator) -> None:
        super().__init__()
        self.sizes = sizes
        dim = sizes[-1]
        self.tables = size_tables(n, sizes, std, generator)
        self.maps = torch.nn.ModuleList([torch.nn.Linear(s, dim) for s in sizes])
        self.bns = torch.nn.ModuleList([torch.nn.BatchNorm1d(dim) for _ in sizes])
        self.controller = Controller(len(sizes), hidden)
        self.register_buffer("pop", popularity_features(counts))

    def weights(self) -> list[torch.nn.Parameter]:
        return [*self.tables.parameters(), *self.maps.parameters(), *self.bns.parameters()]

    def candidates(self, ids: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(len(ids), sizes, d) lifted candidates and the sum of squares of their rows."""
        out, reg = [], self.tables[0].new_zeros(())
        for k in range(len(self.sizes)):
            rows = self.tables[k][ids]
            reg = reg + rows.pow(2).sum()
            out.append(torch.tanh(batch_norm(self.bns[k], self.maps[k](rows), mode)))
        return torch.stack(out, dim=1), reg

    def mix(self, ids: torch.Tensor, mode: str, alpha: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        cands, reg = self.candidates(ids, mode)
        if alpha is None:
            alpha = self.controller(self.pop[ids]).detach()
        return torch.einsum("bk,bkd->bd", alpha, cands), reg

    @torch.no_grad()
    def deployed_vectors(self) -> np.ndarray:
        n = len(self.pop)
        parts = [self.mix(torch.arange(s, min(s + DEPLOY_CHUNK, n)), "eval")[0]
                 for s in range(0, n, DEPLOY_CHUNK)]
        return torch.cat(parts).cpu().numpy().astype(np.float32)


class AutoEmbSearch(torch.nn.Module):
    """Both sides, the alternating optimisers and the validation batches."""

    def __init__(self, data: InteractionData, cfg: PretrainConfig, options: AutoEmbOptions,
                 budget_bytes: int) -> None:
        super().__init__()
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        self.sizes = dm.candidate_sizes(cfg.dim)
        self.cfg, self.budget = cfg, budget_bytes
        minimum = dm.autoemb_bytes([data.n_items] + [0] * (len(self.sizes) - 1), self.sizes)
        if minimum > budget_bytes:
            raise BudgetError(f"autoemb: budget {budget_bytes} B is below the minimum "
                              f"{minimum} B (every one of {data.n_items} items at size "
                              f"{self.sizes[0]}, its lifting map, one user vector)")
        self.user = Side(data.n_users, self.sizes, np.asarray(data.train.getnnz(axis=1)),
                         cfg.init_std, options.controller_hidden, gen)
        self.item = Side(data.n_items, self.sizes, data.item_popularity, cfg.init_std,
                         options.controller_hidden, gen)
        self.opt = torch.optim.Adam([*self.user.weights(), *self.item.weights()], lr=cfg.lr)
        self.ctrl_opt = torch.optim.Adam(
            [*self.user.controller.parameters(), *self.item.controller.parameters()],
            lr=options.controller_lr)
        coo = data.valid.tocoo()
        self.valid_u, self.valid_i = coo.row.astype(np.int64), coo.col.astype(np.int64)
        self.valid_sampler = NegativeSampler((data.train + data.valid).tocsr())
        self.data = data
        self._items: torch.Tensor | None = None
        #: the items' fixed size levels once the sizes are derived ("retrain"), else None
        self.fixed: torch.Tensor | None = None
        self._fixed_info: dict[str, Any] = {}

    def fix_sizes(self, levels: np.ndarray, info: dict[str, Any]) -> None:
        """From now on each item is its one lifted candidate at ``levels`` (training and
        deployment) and the controllers stay as they are; ``info`` (the search's sizes and
        demotions) is reported with every deployment."""
        self.fixed = torch.as_tensor(np.asarray(levels, dtype=np.int64))
        self._fixed_info = dict(info)
        self._items = None

    def _item_alpha(self, ids: torch.Tensor) -> torch.Tensor | None:
        """One-hot weights on the fixed sizes, or None (the controller's soft weights)."""
        if self.fixed is None:
            return None
        return torch.nn.functional.one_hot(self.fixed[ids], len(self.sizes)).float()

    def _item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        return self.item.mix(ids, "eval", self._item_alpha(ids))[0]

    def _bpr(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, mode: str,
             controllers: bool) -> tuple[torch.Tensor, torch.Tensor]:
        uu, u_inv = torch.unique(users, return_inverse=True)
        ii, i_inv = torch.unique(torch.cat([pos, neg.reshape(-1)]), return_inverse=True)
        if not controllers:
            uv, ureg = self.user.mix(uu, mode)
            iv, ireg = self.item.mix(ii, mode, self._item_alpha(ii))
        else:  # controllers' step: candidates fixed, only the weights carry gradients
            with torch.no_grad():
                uc, _ = self.user.candidates(uu, mode)
                ic, _ = self.item.candidates(ii, mode)
            uv = torch.einsum("bk,bkd->bd", self.user.controller(self.user.pop[uu]), uc)
            iv = torch.einsum("bk,bkd->bd", self.item.controller(self.item.pop[ii]), ic)
            ureg = ireg = uv.new_zeros(())
        b = len(users)
        eu, pv = uv[u_inv], iv[i_inv[:b]]
        nv = iv[i_inv[b:]].reshape(b, neg.shape[1], -1)
        pos_s = (eu * pv).sum(-1)
        neg_s = torch.einsum("bd,bkd->bk", eu, nv)
        loss = torch.nn.functional.softplus(neg_s - pos_s.unsqueeze(1)).mean()
        return loss, ureg + ireg

    def train_step(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                   lr: float, rng: np.random.Generator) -> float:
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss, reg = self._bpr(users, pos, neg, "train", controllers=False)
        loss = loss + self.cfg.l2 * 0.5 * reg / len(users)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if len(self.valid_u) and self.fixed is None:  # first-order DARTS: the controllers,
            # on a validation batch (not once the sizes are fixed)
            idx = rng.integers(0, len(self.valid_u), size=min(len(users), len(self.valid_u)))
            vu = self.valid_u[idx]
            vn = self.valid_sampler.sample(vu, neg.shape[1], rng)
            vloss, _ = self._bpr(torch.from_numpy(vu), torch.from_numpy(self.valid_i[idx]),
                                 torch.from_numpy(vn), "eval", controllers=True)
            self.ctrl_opt.zero_grad(set_to_none=True)
            vloss.backward()
            self.ctrl_opt.step()
        return float(loss.detach())

    def start_epoch(self) -> None:
        """Refresh the lifted items that hard negatives are picked with."""
        self._items = lifted_all(self._item_vectors, len(self.item.pop))

    def hardest(self, users: torch.Tensor, cand: torch.Tensor, k: int) -> torch.Tensor:
        if self._items is None:
            self.start_epoch()
        return hardest_negatives(lambda i: self.user.mix(i, "eval")[0], self._items,
                                 users, cand, k)

    @torch.no_grad()
    def item_weights(self) -> np.ndarray:
        return self.item.controller(self.item.pop).cpu().numpy()

    def deploy(self) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
        if self.fixed is not None:
            levels = self.fixed.numpy()
            arrays = self._arrays(levels)
            return self.user.deployed_vectors(), arrays, {
                **self._fixed_info, "item_sizes": size_histogram(levels, self.sizes)}
        weights = self.item_weights()
        argmax = weights.argmax(axis=1)
        levels, demoted = demote_to_fit(argmax, weights, self.sizes, self.budget)
        arrays = self._arrays(levels)
        info = {"item_sizes": size_histogram(levels, self.sizes),
                "argmax_item_sizes": size_histogram(argmax, self.sizes),
                "demoted_items": int(demoted.sum()),
                "mean_argmax_weight": float(weights.max(axis=1).mean())}
        users = self.user.deployed_vectors()
        if self.data.valid.nnz:  # what the hard argmax costs: the soft items, not deployable
            soft = lifted_all(lambda i: self.item.mix(i, "eval")[0], len(self.item.pop))
            metrics = evaluate(dot_scorer(users, soft), self.data, "valid", ks=(20,),
                               batch_size=self.cfg.eval_batch_size).metrics
            info["soft_valid_recall@20"] = selection_recall(metrics)
        return users, arrays, info

    def _arrays(self, levels: np.ndarray) -> dict[str, np.ndarray]:
        """What the device stores for items at ``levels``: rows, codes, folded maps in use."""
        arrays = class_tables(self.item.tables, levels, self.sizes)
        for k, s in enumerate(self.sizes):
            if (levels == k).any():
                scale, shift = folded_bn(self.item.bns[k])
                lin = self.item.maps[k]
                w = lin.weight.detach().T.cpu().numpy()
                b = lin.bias.detach().cpu().numpy()
                arrays[f"lift_w_{s}"] = (w * scale).astype(np.float32)
                arrays[f"lift_b_{s}"] = (b * scale + shift).astype(np.float32)
        return arrays


class AutoEmb(MultiDimRecommender):
    """Soft size selection searched on validation; the hard argmax deployed within M."""

    name: ClassVar[str] = "autoemb"
    label: ClassVar[str] = "AutoEmb"
    method: ClassVar[str] = "autoemb"

    options_type: ClassVar[type] = AutoEmbOptions
    search_type: ClassVar[type] = AutoEmbSearch
    options: AutoEmbOptions

    def fit(self, data: InteractionData, budget_bytes: int) -> AutoEmb:
        """Search (the base class's loop); with ``deploy="retrain"`` then fix each item's size
        at the searched deployment and train again, keeping whichever of the searched and the
        retrained deployments scores higher on validation (the searched one is the retrained
        phase's epoch 0)."""
        if self.options.deploy == "argmax":
            return super().fit(data, budget_bytes)  # type: ignore[return-value]
        search, found = self._search(data, budget_bytes)
        search.fix_sizes(found.arrays["codes"], {
            k: v for k, v in found.info.items() if k != "item_sizes"})
        again = run_search(data, self.config, search, self.method)
        best = again
        if found.valid_metrics and again.valid_metrics and (
                selection_recall(found.valid_metrics) >= selection_recall(again.valid_metrics)):
            best = found
        result = dataclasses.replace(best, seconds=found.seconds + again.seconds,
                                     history=[*found.history, *again.history])
        extra = {"search_best_epoch": found.best_epoch,
                 "search_valid_recall@20": found.valid_metrics.get("recall@20"),
                 "retrain_best_epoch": again.best_epoch,
                 "retrain_valid_recall@20": again.valid_metrics.get("recall@20"),
                 "deployed_from": "retrain" if best is again else "search"}
        self._finish(data, result, budget_bytes, {**dataclasses.asdict(self.options),
                                                  "budget_bytes": budget_bytes, **extra})
        self.params["best_epoch"] = best.best_epoch  # of the phase deployed
        return self
