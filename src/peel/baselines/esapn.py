"""ESAPN: embedding sizes searched by policy networks (Liu et al., SIGIR 2020).

Every user and item starts at the smallest candidate size (2 of 2, 4, 8, 16, 64, 128 at
d = 128). At each training batch a policy network per side (users, items) reads each batch
member's popularity (standardised log of its training interactions) and its current size
(one-hot) and decides *keep* or *enlarge* to the next size; REINFORCE trains the policies with
the recommender's loss change as the reward. Sizes only grow. Vectors are lifted to d dims as in
the reference code (zgahhblhc/ESAPN, ``RS_MLP``): a chain of affine maps between consecutive
sizes, then one batch norm per side and tanh. An entity that grows from s to s' starts from its
size-s vector passed through the map s -> s' (the reference's transfer), so its lifted vector
is unchanged at the moment it grows and only training makes use of the added dimensions.

What differs from the paper and the reference (``docs/paper-notes.md``, "ESAPN and AutoEmb"):

* data: the training split in shuffled, time-free mini-batches over several epochs, with early
  stopping on validation Recall@20 (the paper streams interactions once, in time order; the
  reference script also keeps training on its test stream, which is not done here);
* predictor and loss: the dot product of the lifted user and item vectors with BPR
  (:mod:`peel.baselines.multidim`), not a CTR MLP with a squared loss on ratings;
* reward: the reference scores the sampled sizes on the previous batch right after transferring
  the vectors, i.e. with unchanged lifted vectors, so its reward does not depend on the action
  (and its "restore the embeddings" line assigns the module to itself, a no-op, so the trial
  transfer is kept). Here the actions are sampled on the batch (on-policy), applied, and the
  reward of each batch member is the drop of its samples' BPR loss over the training step taken
  at the new sizes (measured before and after the step, batch-norm statistics of the batch,
  nothing else changed), minus a running mean per side (the baseline of REINFORCE);
* budget: an item grows only while the device's bytes (item tables at their sizes, the uint8
  size codes, the lifting maps from the smallest size in use upward, the folded batch norm and
  one user vector; :func:`peel.device_multidim.esapn_bytes`) stay within M; growth requests are
  granted in order of the policy's probability of growing until the next would exceed M, and a
  refused request is left out of the policy gradient (the policy did not choose its outcome).
  Users have no budget: the device stores one lifted user vector.

The device stores each item's row at its final size and ranks by the lifted vectors, lifting
them per ranking call (:func:`peel.device_multidim.lifted_scores`).
"""

from __future__ import annotations

import itertools
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
    size_histogram,
    size_tables,
)
from peel.budget import BudgetError
from peel.data import InteractionData
from peel.pretrain import PretrainConfig


@dataclass(frozen=True)
class ESAPNOptions:
    """ESAPN's own knobs (the reference: policy lr 1e-4, 512 hidden units; smaller here since
    the policies read two features and the data are ~1e6 interactions, not 2e7)."""

    policy_lr: float = 1e-3
    policy_hidden: int = 64
    reward_momentum: float = 0.9  # of the running-mean reward baseline

    def validate(self) -> None:
        if not self.policy_lr > 0 or self.policy_hidden < 1 or not 0 <= self.reward_momentum < 1:
            raise ValueError("esapn: need policy_lr > 0, policy_hidden >= 1, "
                             "0 <= reward_momentum < 1")


class Policy(torch.nn.Module):
    """(popularity, one-hot size) -> logits of keep / enlarge."""

    def __init__(self, n_sizes: int, hidden: int) -> None:
        super().__init__()
        self.n_sizes = n_sizes
        self.net = torch.nn.Sequential(torch.nn.Linear(1 + n_sizes, hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, 2))

    def forward(self, pop: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        onehot = torch.nn.functional.one_hot(level, self.n_sizes).to(pop.dtype)
        return self.net(torch.cat([pop, onehot], dim=1))


class Side(torch.nn.Module):
    """One side's tables, lifting chain, batch norm, policy and current sizes."""

    def __init__(self, n: int, sizes: tuple[int, ...], counts: np.ndarray, std: float,
                 hidden: int, generator: torch.Generator) -> None:
        super().__init__()
        self.sizes = sizes
        self.tables = size_tables(n, sizes, std, generator)
        self.chain = torch.nn.ModuleList(
            [torch.nn.Linear(a, b) for a, b in itertools.pairwise(sizes)])
        self.bn = torch.nn.BatchNorm1d(sizes[-1])
        self.policy = Policy(len(sizes), hidden)
        self.register_buffer("pop", popularity_features(counts))
        self.register_buffer("level", torch.zeros(n, dtype=torch.int64))
        self.baseline = 0.0

    def weights(self) -> list[torch.nn.Parameter]:
        return [*self.tables.parameters(), *self.chain.parameters(), *self.bn.parameters()]

    def lift(self, ids: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(lifted vectors of ``ids`` at their current sizes, sum of squares of their rows)."""
        level = self.level[ids]
        h = self.tables[0].new_zeros((0, self.sizes[0]))
        where = []
        reg = h.new_zeros(())
        for k in range(len(self.sizes)):
            sel = torch.nonzero(level == k).squeeze(1)
            rows = self.tables[k][ids[sel]]
            reg = reg + rows.pow(2).sum()
            h = torch.cat([h, rows])
            where.append(sel)
            if k < len(self.chain):
                h = self.chain[k](h)
        h = h[torch.argsort(torch.cat(where))]
        return torch.tanh(batch_norm(self.bn, h, mode)), reg

    @torch.no_grad()
    def grow(self, ids: torch.Tensor) -> None:
        """Move ``ids`` one size up, starting from their vectors mapped to the new size."""
        level = self.level[ids]
        for k in range(len(self.chain)):
            moving = ids[level == k]
            if len(moving):
                self.tables[k + 1][moving] = self.chain[k](self.tables[k][moving])
        self.level[ids] = level + 1

    @torch.no_grad()
    def deployed_vectors(self) -> np.ndarray:
        n = len(self.level)
        parts = [self.lift(torch.arange(s, min(s + DEPLOY_CHUNK, n)), "eval")[0]
                 for s in range(0, n, DEPLOY_CHUNK)]
        return torch.cat(parts).cpu().numpy().astype(np.float32)


class ESAPNSearch(torch.nn.Module):
    """Both sides, their optimisers and the budget gate on item growth."""

    def __init__(self, data: InteractionData, cfg: PretrainConfig, options: ESAPNOptions,
                 budget_bytes: int) -> None:
        super().__init__()
        torch.manual_seed(cfg.seed)  # the Linear layers' initialisation
        gen = torch.Generator().manual_seed(cfg.seed)
        self.sizes = dm.candidate_sizes(cfg.dim)
        self.cfg, self.options, self.budget = cfg, options, budget_bytes
        user_pop = np.asarray(data.train.getnnz(axis=1))
        self.user = Side(data.n_users, self.sizes, user_pop, cfg.init_std,
                         options.policy_hidden, gen)
        self.item = Side(data.n_items, self.sizes, data.item_popularity, cfg.init_std,
                         options.policy_hidden, gen)
        start = self.item_bytes()
        if start > budget_bytes:
            raise BudgetError(f"esapn: budget {budget_bytes} B is below the minimum {start} B "
                              f"(every one of {data.n_items} items at size {self.sizes[0]}, "
                              "the lifting maps, one user vector)")
        self.opt = torch.optim.Adam([*self.user.weights(), *self.item.weights()], lr=cfg.lr)
        self.policy_opt = torch.optim.Adam(
            [*self.user.policy.parameters(), *self.item.policy.parameters()],
            lr=options.policy_lr)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.refused = 0
        self._items: torch.Tensor | None = None

    def item_bytes(self) -> int:
        counts = torch.bincount(self.item.level, minlength=len(self.sizes)).numpy()
        return dm.esapn_bytes(counts, self.sizes)

    def _act(self, side: Side, ids: torch.Tensor, gate: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample keep / enlarge for ``ids``; returns (log-prob of the action, ids to grow,
        mask of the actions the policy chose freely)."""
        level = side.level[ids]
        logits = side.policy(side.pop[ids], level)
        probs = torch.softmax(logits.detach(), dim=1)
        action = torch.multinomial(probs, 1, generator=self.gen).squeeze(1)
        free = level < len(self.sizes) - 1
        action = action * free
        grow = action.bool()
        if gate and bool(grow.any()):
            grow = self._within_budget(ids, level, grow, probs[:, 1])
            free = free & (grow | (action == 0))
        logp = torch.log_softmax(logits, dim=1).gather(1, action.unsqueeze(1)).squeeze(1)
        return logp, ids[grow], free

    def _within_budget(self, ids: torch.Tensor, level: torch.Tensor, grow: torch.Tensor,
                       p_grow: torch.Tensor) -> torch.Tensor:
        """The growth requests that fit, most wanted first; the rest are refused."""
        cand = torch.nonzero(grow).squeeze(1)
        order = cand[torch.argsort(-p_grow[cand], stable=True)]
        sizes = torch.tensor(self.sizes)
        added = (sizes[level[order] + 1] - sizes[level[order]]) * dm.FLOAT_BYTES
        room = self.budget - self.item_bytes()
        ok = order[torch.cumsum(added, 0) <= room]
        out = torch.zeros_like(grow)
        out[ok] = True
        self.refused += int(len(cand) - len(ok))
        return out

    def _per_sample(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                    uu: torch.Tensor, u_inv: torch.Tensor, ii: torch.Tensor,
                    i_inv: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        uv, ureg = self.user.lift(uu, mode)
        iv, ireg = self.item.lift(ii, mode)
        b = len(users)
        eu, pv = uv[u_inv], iv[i_inv[:b]]
        nv = iv[i_inv[b:]].reshape(b, neg.shape[1], -1)
        pos_s = (eu * pv).sum(-1)
        neg_s = torch.einsum("bd,bkd->bk", eu, nv)
        return torch.nn.functional.softplus(neg_s - pos_s.unsqueeze(1)).mean(1), ureg + ireg

    def train_step(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                   lr: float, rng: np.random.Generator) -> float:
        uu, u_inv = torch.unique(users, return_inverse=True)
        ii, i_inv = torch.unique(torch.cat([pos, neg.reshape(-1)]), return_inverse=True)
        u_logp, u_grow, u_free = self._act(self.user, uu, gate=False)
        i_logp, i_grow, i_free = self._act(self.item, ii, gate=True)
        self.user.grow(u_grow)
        self.item.grow(i_grow)
        # the recommender's step at the new sizes
        for group in self.opt.param_groups:
            group["lr"] = lr
        before, reg = self._per_sample(users, pos, neg, uu, u_inv, ii, i_inv, "train")
        loss = before.mean() + self.cfg.l2 * 0.5 * reg / len(users)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            after, _ = self._per_sample(users, pos, neg, uu, u_inv, ii, i_inv, "batch")
            reward = (before.detach() - after)  # per sample: how much the step helped
            r_user = _mean_by(reward, u_inv, len(uu))
            k = neg.shape[1]
            per_item = torch.cat([reward, reward.repeat_interleave(k)])
            r_item = _mean_by(per_item, i_inv, len(ii))
        policy_loss = (self._reinforce(self.user, u_logp, r_user, u_free)
                       + self._reinforce(self.item, i_logp, r_item, i_free))
        if policy_loss.requires_grad:
            self.policy_opt.zero_grad(set_to_none=True)
            policy_loss.backward()
            self.policy_opt.step()
        return float(loss.detach())

    def start_epoch(self) -> None:
        """Refresh the lifted items that hard negatives are picked with."""
        self._items = lifted_all(lambda i: self.item.lift(i, "eval")[0],
                                 len(self.item.pop))

    def hardest(self, users: torch.Tensor, cand: torch.Tensor, k: int) -> torch.Tensor:
        if self._items is None:
            self.start_epoch()
        return hardest_negatives(lambda i: self.user.lift(i, "eval")[0], self._items,
                                 users, cand, k)

    def _reinforce(self, side: Side, logp: torch.Tensor, reward: torch.Tensor,
                   free: torch.Tensor) -> torch.Tensor:
        m = self.options.reward_momentum
        advantage = reward - side.baseline
        side.baseline = m * side.baseline + (1 - m) * float(reward.mean())
        if not bool(free.any()):
            return logp.new_zeros(())
        return -(logp * advantage * free).sum() / free.sum()

    def deploy(self) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
        levels = self.item.level.cpu().numpy()
        arrays = class_tables(self.item.tables, levels, self.sizes)
        first = int(levels.min())
        for j in range(first, len(self.item.chain)):
            lin = self.item.chain[j]
            s = self.sizes[j]
            arrays[f"chain_w_{s}"] = lin.weight.detach().T.cpu().numpy().astype(np.float32)
            arrays[f"chain_b_{s}"] = lin.bias.detach().cpu().numpy().astype(np.float32)
        arrays["bn_scale"], arrays["bn_shift"] = folded_bn(self.item.bn)
        info = {"item_sizes": size_histogram(levels, self.sizes),
                "user_sizes": size_histogram(self.user.level.cpu().numpy(), self.sizes),
                "growth_refused_by_budget": self.refused}
        return self.user.deployed_vectors(), arrays, info


def _mean_by(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    total = torch.zeros(n, dtype=values.dtype).index_add_(0, index, values)
    count = torch.zeros(n, dtype=values.dtype).index_add_(0, index, torch.ones_like(values))
    return total / count.clamp(min=1)


class ESAPN(MultiDimRecommender):
    """Per-item sizes grown by REINFORCE policies until the device budget is reached."""

    name: ClassVar[str] = "esapn"
    label: ClassVar[str] = "ESAPN"
    method: ClassVar[str] = "esapn"

    options_type: ClassVar[type] = ESAPNOptions
    search_type: ClassVar[type] = ESAPNSearch
    options: ESAPNOptions
