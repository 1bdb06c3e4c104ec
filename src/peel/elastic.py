"""Stage 2: personalized elastic embedding learning (paper Section IV-C, Eq. 4-10, Alg. 1).

For every user group a copy of the pretrained item table is seen as |V| x N blocks of d. Each
block is batch-normalised and squashed by tanh (Eq. 4) so blocks are magnitude-comparable; a
controller (Eq. 7) turns the group's interaction share per item group plus the current loss into
importance weights alpha (G_v x N); the item representation is the alpha-weighted blocks. The
scorer is either the paper's MLP (Eq. 5-6) or the deployment similarity itself (Eq. 10 on
alpha-weighted blocks). W (item table, group users, scorer) and V (controller) are trained by
the bi-level scheme of Algorithm 1: V descends the validation loss through the one-step
unrolled W - xi * grad_W L_train(W, V) (second order, exact), then W descends the training
loss with the current alpha.

Why it is fast enough for gowalla-sized groups on a CPU:

* Every step works on the rows its mini-batches touch. The unrolled step is exact on that
  sub-table because rows outside the training batch have zero gradient (W' = W there), so the
  validation loss sees the same W' as with the full table. Item and user tables are updated by
  a lazy (row-wise) Adam, so a step never streams the full table.
* Batch-norm statistics are taken over the batch's items (as in training); the deployed blocks
  (running statistics, tanh) are computed once per evaluation and once at the end.

Outputs per user group (``RUN/groups/group_{g:03d}.npz``; written by :func:`train_group`):
``blocks`` (n_items, N, d) float32 as deployed (eval-mode BN + tanh; alpha NOT folded in),
``alpha`` (G_v, N) float32 exactly as used in training (see ``alpha_scale``), ``item_group``
int32, ``users`` int64, ``user_emb`` (n_g, D) float32; plus a JSON log next to it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from peel.budget import SCALES, SIMILARITIES
from peel.data import InteractionData, from_splits
from peel.errors import OutputError
from peel.eval import EvalResult, evaluate
from peel.io import load_npz, read_json, save_npz, write_json
from peel.rotation import svd_rotate
from peel.runfolder import group_paths

log = logging.getLogger(__name__)

SCORERS = ("dot", "mlp")
USER_INITS = ("pretrained", "bn_scaled")
ALPHA_SCALES = ("global", "literal", "per_group")
HYPERGRADIENTS = ("second_order", "first_order")
EARLY_STOP = ("recall", "loss")
#: "pretrained": blocks are slices of the pretrained table as it is (the paper); "svd": the
#: pretrained model rotated into the singular basis of its whole score matrix; "svd_group":
#: rotated into the singular basis of the user group's own score matrix (peel.rotation)
INITS = ("pretrained", "svd", "svd_group")
#: "eq4": batch-norm + tanh of every block (the paper's Eq. 4); "identity": blocks as they are
TRANSFORMS = ("eq4", "identity")
#: where deployment's block weights come from: "controller" (Eq. 7, learned bi-level) or
#: "energy" (each (item group, block) pair's share of the group's squared scores)
IMPORTANCES = ("controller", "energy")
GROUP_ARRAYS = ("blocks", "alpha", "item_group", "users", "user_emb")


@dataclass(frozen=True)
class FinetuneConfig:
    """Group-level fine-tuning. Paper defaults: N=16, d=8, Adam lr 1e-3, early stopping.

    The choices the paper leaves open (see docs/paper-notes.md, "Stage 2") are fields:
    ``alpha_scale`` (how the softmax over all G_v*N weights is scaled), ``scorer`` (MLP of
    Eq. 5-6 or the deployment similarity), ``similarity`` (how Eq. 10 pairs user chunks with
    item blocks) and ``hypergradient`` (exact unrolled second-order step or first-order).
    """

    n_blocks: int = 16  # N
    block_dim: int = 8  # d
    # measured defaults (docs/paper-notes.md, "Stage 2"): "dot" trains with the similarity the
    # device ranks with; "mlp" is the paper's Eq. 5-6 scorer
    scorer: str = "dot"  # "mlp": Eq. 5-6 | "dot": Eq. 10 on alpha-weighted blocks
    similarity: str = "aligned"  # "aligned": block n vs user chunk n | "literal": vs sum
    # "none": deployed scores are plain sums over kept blocks | "eq10": times the paper's factor
    # max_k |S_k| / |S_g|. Used by early stopping and stored in packages (docs/paper-notes.md)
    scale: str = "none"
    # "per_group": softmax within each item group x N (rows sum to N) | "global": softmax over
    # all G_v*N x G_v*N | "literal": plain softmax over all (sums to 1, Eq. 7 as written)
    alpha_scale: str = "literal"
    hypergradient: str = "second_order"  # | "first_order" (DARTS first order, xi = 0)
    # "pretrained": users start from the pretrained vectors (the paper); "bn_scaled": each
    # dimension is multiplied by the item table's std, so that at the start u . BN(v) equals
    # u . (v - mean) and Eq. 10 ranks (up to tanh) as the pretrained dot product did
    user_init: str = "pretrained"
    # Measured defaults (docs/paper-notes.md, "Stage 2: a start that loses nothing"): each
    # group starts from its own singular basis with blocks as they are, so every block kept
    # reproduces the pretrained scores and the leading blocks carry the most score energy;
    # deployment orders blocks by that energy. The paper's reading: pretrained / eq4 /
    # controller (``peel train --config paper``).
    init: str = "svd_group"
    transform: str = "identity"
    importance: str = "energy"
    # Train what the device runs: besides the full table, every step also takes the BPR loss
    # of the blocks a device would keep at each of these budgets (fractions of the full item
    # table, selected from the current importance once per epoch), averaged. Empty: the full
    # table only (the paper). Needs scorer="dot" and similarity="aligned".
    train_budgets: tuple[float, ...] = (0.107, 0.213, 0.533)
    # In-place distillation (slimmable networks, Yu & Huang 2019): weight of a loss that makes
    # each training budget's kept blocks order every (positive, negative) pair the way the full
    # table does, P = sigmoid(full margin, detached), cross-entropy against the kept blocks'
    # margin. 0 = off. Needs train_budgets.
    distill: float = 0.0
    mlp_layers: int = 2  # L2 tanh layers of Eq. 5
    mlp_hidden: int = 64
    controller_layers: int = 2  # L3 tanh layers of Eq. 7
    controller_hidden: int = 64
    lr: float = 1e-3  # Adam, for W (item table, users, scorer)
    controller_lr: float = 1e-3  # Adam, for V
    xi: float | None = None  # step of the unrolled update; None = lr (as in DARTS)
    l2: float = 0.0  # weight decay on the batch's user/item rows
    batch_size: int = 1024
    max_epochs: int = 40
    patience: int = 3  # evaluations without improvement before stopping
    early_stop: str = "recall"  # "recall": deployed valid Recall@20 | "loss": valid BPR loss
    # budgets (fractions of the full item table) whose deployed Recall@20 is averaged for the
    # "recall" criterion; more than 1.0 makes early stopping care about the elastic use too
    early_stop_budgets: tuple[float, ...] = (1.0, 0.107, 0.213, 0.533)
    eval_users: int = 2000  # validation users evaluated per group (seeded sample), 0 = all
    val_loss_samples: int = 20000  # fixed validation triples for the loss criterion/log
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    # torch threads inside one group's training. Fixed (not taken from the worker) because
    # intra-op parallel reductions round differently with different thread counts; a fixed
    # value makes outputs bitwise identical for any number of workers. Parallelism comes from
    # training groups in parallel, which suits these small per-step tensors better anyway.
    threads: int = 1

    @property
    def dim(self) -> int:
        return self.n_blocks * self.block_dim

    @property
    def unroll_step(self) -> float:
        return self.lr if self.xi is None else self.xi

    def validate(self) -> None:
        checks = {"scorer": SCORERS, "similarity": SIMILARITIES, "scale": SCALES,
                  "alpha_scale": ALPHA_SCALES,
                  "hypergradient": HYPERGRADIENTS, "early_stop": EARLY_STOP,
                  "user_init": USER_INITS, "init": INITS, "transform": TRANSFORMS,
                  "importance": IMPORTANCES}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.n_blocks < 1 or self.block_dim < 1:
            raise ValueError("n_blocks and block_dim must be >= 1")
        if self.batch_size < 1 or self.max_epochs < 0 or self.patience < 1:
            raise ValueError("batch_size >= 1, max_epochs >= 0 and patience >= 1 are required")
        if self.mlp_layers < 0 or self.controller_layers < 0:
            raise ValueError("mlp_layers and controller_layers must be >= 0")
        if self.threads < 1:
            raise ValueError("threads must be >= 1")
        if not self.early_stop_budgets or not all(0 < b <= 1 for b in self.early_stop_budgets):
            raise ValueError("early_stop_budgets must be fractions in (0, 1]")
        if not all(0 < b <= 1 for b in self.train_budgets):
            raise ValueError("train_budgets must be fractions in (0, 1]")
        if self.distill < 0 or (self.distill > 0 and not self.train_budgets):
            raise ValueError("distill must be >= 0 and needs train_budgets (it distils the "
                             "full table into each budget's kept blocks)")
        if self.train_budgets and (self.scorer, self.similarity) != ("dot", "aligned"):
            raise ValueError("train_budgets needs scorer='dot' and similarity='aligned' (the "
                             "kept blocks' scores are partial sums of the aligned dot product)")


# ---------------------------------------------------------------------------------------------
# Small functional building blocks (functional so the unrolled step can swap in W')
# ---------------------------------------------------------------------------------------------


def init_mlp(sizes: Sequence[int], gen: torch.Generator, dtype: torch.dtype,
             zero_last: bool = False) -> list[torch.Tensor]:
    """Weights/biases [W0, b0, W1, b1, ...] with PyTorch's default uniform(+-1/sqrt(fan_in))."""
    params: list[torch.Tensor] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        bound = 1.0 / math.sqrt(fan_in)
        w = (torch.rand(fan_out, fan_in, generator=gen, dtype=dtype) * 2 - 1) * bound
        b = (torch.rand(fan_out, generator=gen, dtype=dtype) * 2 - 1) * bound
        if zero_last and i == len(sizes) - 2:
            w.zero_()
            b.zero_()
        params += [w.requires_grad_(), b.requires_grad_()]
    return params


def mlp_forward(params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """tanh hidden layers (Eq. 5 / Eq. 7) and a linear output layer."""
    n_layers = len(params) // 2
    for i in range(n_layers):
        x = torch.nn.functional.linear(x, params[2 * i], params[2 * i + 1])
        if i < n_layers - 1:
            x = torch.tanh(x)
    return x


def alpha_from_logits(logits: torch.Tensor, n_item_groups: int, n_blocks: int,
                      scale: str) -> torch.Tensor:
    """(G_v, N) weights from the controller's G_v*N outputs, laid out as in Eq. 7.

    The paper indexes alpha^n_g = e_c[G_v * n + g] (block-major), so logits are read as
    (N, G_v) and transposed. ``scale``: "literal" = plain softmax (all weights sum to 1);
    "global" = the same softmax times G_v*N (mean weight 1, cross-group allocation kept);
    "per_group" = a softmax within each item group times N (each row sums to N).
    """
    table = logits.reshape(n_blocks, n_item_groups).T
    if scale == "per_group":
        return torch.softmax(table, dim=1) * n_blocks
    flat = torch.softmax(table.reshape(-1), dim=0).reshape(n_item_groups, n_blocks)
    if scale == "global":
        return flat * (n_item_groups * n_blocks)
    return flat


def normalise_blocks(rows: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, n_blocks: int,
                     eps: float) -> torch.Tensor:
    """Eq. 4: per-block, per-dimension batch-norm (no affine, as written) then tanh."""
    x = torch.tanh((rows - mean) * torch.rsqrt(var + eps))
    return x.reshape(rows.shape[0], n_blocks, -1)


def block_energy(users: torch.Tensor, blocks: torch.Tensor, item_group: torch.Tensor,
                 n_item_groups: int) -> torch.Tensor:
    """(G_v, N) squared-score mass of each (item group, block) pair over ``users``, mean 1."""
    n_blocks = blocks.shape[1]
    u = users.reshape(users.shape[0], n_blocks, -1).to(torch.float64)
    gram = torch.einsum("und,une->nde", u, u)  # U_n' U_n per block
    b = blocks.to(torch.float64)
    per_item = torch.einsum("jnd,nde,jne->jn", b, gram, b)
    table = torch.zeros(n_item_groups, n_blocks, dtype=torch.float64)
    table.index_add_(0, item_group, per_item)
    mean = table.mean()
    return (table / mean if mean > 0 else torch.ones_like(table)).to(users.dtype)


def pair_scores(user: torch.Tensor, items: torch.Tensor, similarity: str) -> torch.Tensor:
    """Eq. 10 at full budget between matching rows: user (B, D), items (B, N, d) -> (B,).

    "aligned" compares block n with the user's n-th chunk of d; "literal" repeats the block N
    times as Eq. 10 writes it, i.e. compares every block with the sum of the user's chunks.
    """
    u = user.reshape(items.shape)
    if similarity == "aligned":
        return (u * items).sum(dim=(1, 2))
    return (u.sum(dim=1) * items.sum(dim=1)).sum(dim=1)


def bpr(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """-ln sigma(y_pos - y_neg), averaged (the scorer's logits; Eq. 6's sigma is monotone)."""
    return torch.nn.functional.softplus(neg - pos).mean()


# ---------------------------------------------------------------------------------------------
# Mini-batches on the rows they touch
# ---------------------------------------------------------------------------------------------


@dataclass
class Triples:
    """(user, positive, negative) in group-local user ids and global item ids."""

    users: np.ndarray
    pos: np.ndarray
    neg: np.ndarray

    def __len__(self) -> int:
        return len(self.users)


@dataclass
class LocalBatch:
    """A set of triples re-indexed into the unique rows of the tables they touch."""

    item_rows: torch.Tensor  # unique global item ids
    user_rows: torch.Tensor  # unique local user ids
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (u, p, n) into those rows


def localise(*triples: Triples) -> LocalBatch:
    """Gather the union of touched rows once so several losses can share one sub-table."""
    items = np.concatenate([a for t in triples for a in (t.pos, t.neg)])
    users = np.concatenate([t.users for t in triples])
    item_rows, item_inv = np.unique(items, return_inverse=True)
    user_rows, user_inv = np.unique(users, return_inverse=True)
    parts = []
    i_off = u_off = 0
    for t in triples:
        b = len(t)
        parts.append((torch.from_numpy(user_inv[u_off:u_off + b]),
                      torch.from_numpy(item_inv[i_off:i_off + b]),
                      torch.from_numpy(item_inv[i_off + b:i_off + 2 * b])))
        i_off += 2 * b
        u_off += b
    return LocalBatch(torch.from_numpy(item_rows), torch.from_numpy(user_rows), parts)


class PositiveSet:
    """Membership test for (user, item) pairs, vectorised with one sorted key array."""

    def __init__(self, matrices: Sequence[sp.csr_matrix], n_items: int) -> None:
        keys = []
        for m in matrices:
            coo = m.tocoo()
            keys.append(coo.row.astype(np.int64) * n_items + coo.col.astype(np.int64))
        self.keys = np.unique(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.int64)
        self.n_items = n_items

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        if len(self.keys) == 0:
            return np.zeros(len(users), dtype=bool)
        q = users.astype(np.int64) * self.n_items + items
        pos = np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)
        return self.keys[pos] == q

    def sample_negatives(self, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Uniform items, redrawn (a few rounds) where they hit a positive."""
        items = rng.integers(0, self.n_items, size=len(users))
        for _ in range(10):
            bad = self.contains(users, items)
            if not bad.any():
                break
            items[bad] = rng.integers(0, self.n_items, size=int(bad.sum()))
        return items


class RowAdam:
    """Lazy Adam for embedding tables: only the rows in a step are read and written.

    Same update as torch.optim.SparseAdam (bias correction with the global step count), which
    keeps a step's cost proportional to the batch rather than to |V|.
    """

    def __init__(self, table: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.table = table
        self.m = torch.zeros_like(table)
        self.v = torch.zeros_like(table)
        self.lr, self.betas, self.eps = lr, betas, eps
        self.t = 0

    @torch.no_grad()
    def step(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.t += 1
        m = self.m[rows].mul_(b1).add_(grad, alpha=1 - b1)
        v = self.v[rows].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        self.m[rows] = m
        self.v[rows] = v
        step = self.lr * math.sqrt(1 - b2**self.t) / (1 - b1**self.t)
        self.table[rows] -= step * m / (v.sqrt() + self.eps)


# ---------------------------------------------------------------------------------------------
# One user group's model
# ---------------------------------------------------------------------------------------------


class GroupModel:
    """W = (item table, group users' table, scorer MLP) and V = controller, as plain tensors.

    Plain tensors rather than nn.Modules because the unrolled step needs to evaluate the loss
    at W' = W - xi * grad, which is simplest with explicit functional forward passes.
    """

    def __init__(self, item_emb: np.ndarray, user_emb: np.ndarray, item_group: np.ndarray,
                 context: np.ndarray, cfg: FinetuneConfig, gen: torch.Generator,
                 dtype: torch.dtype = torch.float32) -> None:
        if item_emb.shape[1] != cfg.dim or user_emb.shape[1] != cfg.dim:
            raise ValueError(f"embeddings have {item_emb.shape[1]}/{user_emb.shape[1]} columns"
                             f" but n_blocks*block_dim = {cfg.dim}")
        self.cfg = cfg
        self.items = torch.tensor(item_emb, dtype=dtype)
        self.users = torch.tensor(user_emb, dtype=dtype)
        self.item_group = torch.as_tensor(np.asarray(item_group, dtype=np.int64))
        self.n_item_groups = int(self.item_group.max()) + 1 if len(item_group) else 1
        self.context = torch.tensor(np.asarray(context), dtype=dtype)  # interaction shares
        # Running statistics start from the pretrained table so epoch-0 evaluation is sane.
        self.run_mean = self.items.mean(0)
        self.run_var = self.items.var(0)
        if cfg.user_init == "bn_scaled":
            self.users *= torch.sqrt(self.run_var + cfg.bn_eps)
        mlp_in = 2 * cfg.dim
        self.mlp = (init_mlp([mlp_in] + [cfg.mlp_hidden] * cfg.mlp_layers + [1], gen, dtype)
                    if cfg.scorer == "mlp" else [])
        ctrl_sizes = ([self.n_item_groups + 1] + [cfg.controller_hidden] * cfg.controller_layers
                      + [self.n_item_groups * cfg.n_blocks])
        # Zero output layer: alpha starts uniform, so no block is preferred before any evidence.
        self.controller = init_mlp(ctrl_sizes, gen, dtype, zero_last=True)
        self.last_loss = math.log(2.0)  # BPR loss of an untrained scorer; controller input
        self.budget_masks: torch.Tensor | None = None  # (M, G_v, N) see refresh_budget_masks
        self.group: int | None = None  # user group id, recorded in package headers

    # -- controller ------------------------------------------------------------------------

    def alpha(self, controller: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Eq. 7: alpha from [p_1..p_Gv, L_rec] (the loss enters as a detached scalar).

        With ``importance="energy"`` there is no controller: training sees every block with
        weight 1 and deployment ranks blocks by :meth:`importance` instead.
        """
        if self.cfg.importance == "energy":
            return torch.ones(self.n_item_groups, self.cfg.n_blocks, dtype=self.items.dtype)
        params = self.controller if controller is None else controller
        loss = torch.tensor([self.last_loss], dtype=self.context.dtype)
        logits = mlp_forward(params, torch.cat([self.context, loss]))
        return alpha_from_logits(logits, self.n_item_groups, self.cfg.n_blocks,
                                 self.cfg.alpha_scale)

    # -- recommendation loss -------------------------------------------------------------

    def loss(self, item_rows: torch.Tensor, user_rows: torch.Tensor,
             mlp: Sequence[torch.Tensor], alpha: torch.Tensor, groups: torch.Tensor,
             part: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """BPR loss of one part of a :class:`LocalBatch`, plus its BN batch statistics.

        ``item_rows``/``user_rows`` are the gathered sub-tables (possibly W' of the unrolled
        step) and ``groups`` the item group of each gathered item row.
        """
        u, p, n = part
        idx = torch.cat([p, n])
        x = item_rows[idx]
        mean = x.mean(0)
        var = x.var(0, unbiased=False)
        blocks = self._blocks(x, mean, var)
        weighted = blocks * alpha[groups[idx]].unsqueeze(-1)
        uv = user_rows[u]
        b = len(u)
        if self.budget_masks is None:
            scores = self._score(torch.cat([uv, uv]), weighted, mlp)
            loss = bpr(scores[:b], scores[b:])
        else:
            loss = self._sandwich_loss(torch.cat([uv, uv]), weighted, groups[idx], b)
        if self.cfg.l2 > 0:
            loss = loss + self.cfg.l2 * (uv.pow(2).sum() + x.pow(2).sum()) / b
        return loss, mean, var

    def _sandwich_loss(self, users: torch.Tensor, items: torch.Tensor, groups: torch.Tensor,
                       b: int) -> torch.Tensor:
        """Mean BPR loss of the full table and of each budget's kept blocks (plus, with
        ``distill``, each kept set's cross-entropy against the full table's pair order).

        The aligned score is a sum of per-block partial products, so every kept set's score is
        the same partials summed under its (item group, block) mask: one product, M sums.
        """
        partial = (users.reshape(items.shape) * items).sum(-1)  # (2b, N)
        masks = self.budget_masks[:, groups]  # (M, 2b, N)
        scores = torch.cat([partial.sum(-1, keepdim=True).T, (partial * masks).sum(-1)])
        margin = scores[:, :b] - scores[:, b:]  # (1 + M, b): positive minus negative
        losses = torch.nn.functional.softplus(-margin).mean(dim=1)
        loss = losses.mean()
        if self.cfg.distill > 0:
            target = torch.sigmoid(margin[:1].detach()).expand_as(margin[1:])
            kd = torch.nn.functional.binary_cross_entropy_with_logits(margin[1:], target)
            loss = loss + self.cfg.distill * kd
        return loss

    def refresh_budget_masks(self) -> None:
        """Kept (item group, block) pairs at each training budget, from the current importance."""
        if not self.cfg.train_budgets:
            self.budget_masks = None
            return
        weights = self.importance().double().numpy()
        groups = self.item_group.numpy()
        self.budget_masks = torch.stack([
            torch.as_tensor(deployed_mask(weights, groups, self.cfg.block_dim, f,
                                          self.cfg.similarity, self.cfg.scale, self.group))
            for f in self.cfg.train_budgets]).to(self.items.dtype)

    def _score(self, user: torch.Tensor, items: torch.Tensor,
               mlp: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.cfg.scorer == "dot":
            return pair_scores(user, items, self.cfg.similarity)
        h = torch.cat([user, items.reshape(items.shape[0], -1)], dim=1)
        return mlp_forward(mlp, h).squeeze(-1)

    def gather(self, lb: LocalBatch, requires_grad: bool) -> list[torch.Tensor]:
        """W restricted to the batch's rows, as fresh leaves: [items, users, *mlp]."""
        rows = [self.items[lb.item_rows].clone(), self.users[lb.user_rows].clone()]
        if requires_grad:
            rows = [r.requires_grad_() for r in rows]
            return rows + list(self.mlp)
        return rows + [p.detach() for p in self.mlp]

    # -- Algorithm 1 ----------------------------------------------------------------------

    def unrolled_objective(self, lb: LocalBatch, controller: Sequence[torch.Tensor] | None = None,
                           second_order: bool = True) -> torch.Tensor:
        """L_val(W - xi * grad_W L_train(W, V), V) (Eq. 9b), differentiable w.r.t. V.

        ``lb.parts`` = [train part, validation part]. With ``second_order`` the inner gradient
        keeps its graph (create_graph), so d/dV includes the -xi * d2L_train/dVdW term; the
        first-order variant evaluates L_val at the current W (DARTS first order, xi = 0).
        """
        alpha = self.alpha(controller)
        groups = self.item_group[lb.item_rows]
        train_part, val_part = lb.parts
        if second_order:
            w = self.gather(lb, requires_grad=True)
            inner, _, _ = self.loss(w[0], w[1], w[2:], alpha, groups, train_part)
            grads = torch.autograd.grad(inner, w, create_graph=True, allow_unused=True)
            xi = self.cfg.unroll_step
            w = [p if g is None else p - xi * g for p, g in zip(w, grads, strict=True)]
        else:
            w = self.gather(lb, requires_grad=False)
        outer, _, _ = self.loss(w[0], w[1], w[2:], alpha, groups, val_part)
        return outer

    def train_loss(self, lb: LocalBatch, w: Sequence[torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            alpha = self.alpha()
        return self.loss(w[0], w[1], w[2:], alpha, self.item_group[lb.item_rows], lb.parts[0])

    def update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        m = self.cfg.bn_momentum
        unbiased = var * (n / max(n - 1, 1))
        self.run_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
        self.run_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)

    # -- deployment ------------------------------------------------------------------------

    def _blocks(self, rows: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """(rows, N, d) blocks as the scorer sees them: Eq. 4 or the rows as they are."""
        if self.cfg.transform == "identity":
            return rows.reshape(rows.shape[0], self.cfg.n_blocks, -1)
        return normalise_blocks(rows, mean, var, self.cfg.n_blocks, self.cfg.bn_eps)

    @torch.no_grad()
    def deployed_blocks(self) -> torch.Tensor:
        """(n_items, N, d): eval-mode batch-norm (running statistics) and tanh; no alpha."""
        return self._blocks(self.items, self.run_mean, self.run_var)

    @torch.no_grad()
    def importance(self, blocks: torch.Tensor | None = None) -> torch.Tensor:
        """(G_v, N) weights that order blocks for deployment (stored as the group's alpha).

        "controller": Eq. 7's alpha. "energy": the share of the group's squared scores that
        each (item group, block) pair carries, sum_u sum_{j in g} (u_n . e_j^n)^2 =
        sum_{j in g} e_j^n' (U_n' U_n) e_j^n, scaled to mean 1. Greedy selection by it keeps
        the pairs that change the group's scores most per byte (item groups are equal-sized).
        """
        if self.cfg.importance == "controller":
            return self.alpha()
        blocks = self.deployed_blocks() if blocks is None else blocks
        return block_energy(self.users, blocks, self.item_group, self.n_item_groups)

    def snapshot(self) -> dict[str, Any]:
        with torch.no_grad():
            return {
                "items": self.items.clone(), "users": self.users.clone(),
                "run_mean": self.run_mean.clone(), "run_var": self.run_var.clone(),
                "mlp": [p.detach().clone() for p in self.mlp],
                "controller": [p.detach().clone() for p in self.controller],
                "last_loss": self.last_loss,
            }

    def restore(self, snap: dict[str, Any]) -> None:
        with torch.no_grad():
            self.items.copy_(snap["items"])
            self.users.copy_(snap["users"])
            self.run_mean.copy_(snap["run_mean"])
            self.run_var.copy_(snap["run_var"])
            for p, s in zip(self.mlp, snap["mlp"], strict=True):
                p.copy_(s)
            for p, s in zip(self.controller, snap["controller"], strict=True):
                p.copy_(s)
        self.last_loss = snap["last_loss"]


# ---------------------------------------------------------------------------------------------
# Deployed ranking (Section IV-C4 block selection + Eq. 10), used for early stopping and reports
# ---------------------------------------------------------------------------------------------


def deployed_mask(weights: np.ndarray, item_group: np.ndarray, block_dim: int,
                  fraction: float, similarity: str = "aligned", scale: str = "none",
                  group: int | None = None) -> np.ndarray:
    """(G_v, N) bool: the blocks a device keeps for ``fraction`` of the full item table.

    The device's own byte-exact selection (``peel.package.kept_pairs``: header, index and
    user vector count against the budget), so early stopping and budget losses see the
    package a device would get. ``fraction >= 1`` means every block.
    """
    from peel.budget import BudgetError, selection_order
    from peel.package import DeployOptions, kept_pairs

    mask = np.zeros(weights.shape, dtype=bool)
    if fraction >= 1:
        mask[:] = True
        return mask
    try:
        # float32 kept sets: stage 2 trains for the blocks a float32 package keeps (mixed
        # precision packages keep more of them; training for those is not measured yet)
        pairs = kept_pairs(weights, item_group, block_dim, float(fraction),
                           DeployOptions(similarity=similarity, scale=scale, precision="fp32"),
                           group)
    except BudgetError:  # below a package's minimum (tiny catalogues): one block per group
        pairs = selection_order(weights)[: weights.shape[0]]
    mask[pairs[:, 0], pairs[:, 1]] = True
    return mask


class Eq10Scorer:
    """Eq. 10 over all items for users of one group, given a block selection.

    r_ij = max_k |S_k| / |S_j| * sum_{n in S_j} sim(u_i, e_j^n) with ``scale="eq10"``, the plain
    sum with ``scale="none"``; the item-side matrix is built once so scoring a batch of users is
    a single matrix product.
    """

    def __init__(self, blocks: np.ndarray | torch.Tensor, item_group: np.ndarray,
                 mask: np.ndarray, similarity: str, weights: np.ndarray | None = None,
                 scale: str = "none") -> None:
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        b = torch.as_tensor(blocks, dtype=torch.float32)
        groups = torch.as_tensor(np.asarray(item_group, np.int64))
        item_mask = torch.as_tensor(mask)[groups]
        counts = item_mask.sum(1).to(torch.float32)
        factor = counts.max() / counts if scale == "eq10" else torch.ones_like(counts)
        keep = item_mask.to(torch.float32)
        if weights is not None:  # experimental: alpha-weighted deployment (not the paper's)
            keep = keep * torch.as_tensor(weights, dtype=torch.float32)[groups]
        kept = b * keep.unsqueeze(-1)
        self.n_blocks = b.shape[1]
        self.similarity = similarity
        if similarity == "aligned":
            self.item_side = (kept.reshape(b.shape[0], -1) * factor[:, None]).T.contiguous()
        else:
            self.item_side = (kept.sum(1) * factor[:, None]).T.contiguous()

    def __call__(self, user_vecs: np.ndarray | torch.Tensor) -> torch.Tensor:
        u = torch.as_tensor(user_vecs, dtype=torch.float32)
        if self.similarity == "literal":
            u = u.reshape(u.shape[0], self.n_blocks, -1).sum(1)
        return u @ self.item_side


def evaluate_group_deployed(data: InteractionData, users: np.ndarray, user_emb: np.ndarray,
                            blocks: np.ndarray | torch.Tensor, alpha: np.ndarray,
                            item_group: np.ndarray, similarity: str, fraction: float = 1.0,
                            split: str = "valid", eval_users: np.ndarray | None = None,
                            alpha_weighted: bool = False, scale: str = "none",
                            group: int | None = None) -> EvalResult:
    """Rank one group's users with Eq. 10 on deployed blocks under a budget; peel.eval metrics.

    ``users`` are the rows of ``data`` that ``user_emb`` belongs to (in order); ``eval_users``
    (positions into ``users``) restricts the evaluation to a subset. ``alpha_weighted``
    multiplies each kept block by its alpha (a measured alternative, not Eq. 10).
    """
    mask = deployed_mask(np.asarray(alpha), np.asarray(item_group), int(blocks.shape[2]),
                         fraction, similarity, scale, group)
    scorer = Eq10Scorer(blocks, item_group, mask, similarity,
                        alpha if alpha_weighted else None, scale)
    emb = torch.as_tensor(user_emb, dtype=torch.float32)
    pos_of = np.full(data.n_users, -1, dtype=np.int64)
    pos_of[users] = np.arange(len(users))
    chosen = users if eval_users is None else users[eval_users]

    def score(batch: np.ndarray) -> torch.Tensor:
        return scorer(emb[torch.from_numpy(pos_of[batch])])

    return evaluate(score, data, split, ks=(20, 50), users=chosen)


# ---------------------------------------------------------------------------------------------
# Training one group (runs inside an executor worker)
# ---------------------------------------------------------------------------------------------


@dataclass
class GroupTask:
    """Everything one group's training needs; shipped to a worker process."""

    group: int
    users: np.ndarray  # global user ids, sorted
    train: sp.csr_matrix  # rows = the group's users, all items
    valid: sp.csr_matrix
    user_emb: np.ndarray  # (n_g, D) pretrained
    item_emb: np.ndarray  # (n_items, D) pretrained
    item_group: np.ndarray
    cfg: FinetuneConfig
    seed: int
    npz_path: str
    json_path: str
    fingerprint: str


@dataclass
class GroupSummary:
    """What the caller needs to know about one finished (or resumed) group."""

    group: int
    n_users: int
    n_train: int
    n_valid: int
    epochs: int
    best_epoch: int
    valid: dict[str, float]
    seconds: float
    path: str
    skipped: bool = False
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)


def interaction_shares(train: sp.csr_matrix, item_group: np.ndarray, n_groups: int) -> np.ndarray:
    """p_g of Eq. 7: the group's share of training interactions falling in each item group."""
    counts = np.bincount(np.asarray(item_group)[train.indices], minlength=n_groups)
    total = counts.sum()
    return counts / total if total else np.full(n_groups, 1.0 / n_groups)


def _triples_of(m: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    coo = m.tocoo()
    order = np.lexsort((coo.col, coo.row))
    return coo.row[order].astype(np.int64), coo.col[order].astype(np.int64)


class _Trainer:
    """The epoch loop of Algorithm 1 for one group, with early stopping on validation."""

    def __init__(self, task: GroupTask, dtype: torch.dtype = torch.float32) -> None:
        cfg = task.cfg
        self.task, self.cfg = task, cfg
        self.rng = np.random.default_rng([task.seed, task.group])
        gen = torch.Generator().manual_seed(int(self.rng.integers(2**62)))
        n_groups = int(np.max(task.item_group)) + 1
        context = interaction_shares(task.train, task.item_group, n_groups)
        user_emb, item_emb = task.user_emb, task.item_emb
        if cfg.init == "svd_group":  # this group's own singular basis (peel.rotation)
            rot = svd_rotate(user_emb, item_emb)
            user_emb, item_emb = rot.user_emb, rot.item_emb
        self.model = GroupModel(item_emb, user_emb, task.item_group, context, cfg, gen, dtype)
        self.model.group = task.group
        self.n_items = task.item_emb.shape[0]
        self.train_u, self.train_i = _triples_of(task.train)
        self.val_u, self.val_i = _triples_of(task.valid)
        self.train_pos = PositiveSet([task.train], self.n_items)
        self.all_pos = PositiveSet([task.train, task.valid], self.n_items)
        self.data = from_splits(task.train, task.valid,
                                sp.csr_matrix(task.train.shape, dtype=np.float32))
        self.local_users = np.arange(len(task.users), dtype=np.int64)
        self.eval_subset = self._eval_subset()
        self.val_fixed = self._fixed_val_triples()
        self.mlp_opt = torch.optim.Adam(self.model.mlp, lr=cfg.lr) if self.model.mlp else None
        self.ctrl_opt = torch.optim.Adam(self.model.controller, lr=cfg.controller_lr)
        self.item_opt = RowAdam(self.model.items, cfg.lr)
        self.user_opt = RowAdam(self.model.users, cfg.lr)

    def _eval_subset(self) -> np.ndarray | None:
        has_valid = np.flatnonzero(self.task.valid.getnnz(axis=1) > 0)
        if self.cfg.eval_users and len(has_valid) > self.cfg.eval_users:
            return np.sort(self.rng.choice(has_valid, self.cfg.eval_users, replace=False))
        return None

    def _fixed_val_triples(self) -> Triples | None:
        if len(self.val_u) == 0:
            return None
        rng = np.random.default_rng([self.task.seed, self.task.group, 1])
        k = min(self.cfg.val_loss_samples, len(self.val_u))
        idx = np.sort(rng.choice(len(self.val_u), k, replace=False))
        u = self.val_u[idx]
        return Triples(u, self.val_i[idx], self.all_pos.sample_negatives(u, rng))

    # -- steps ---------------------------------------------------------------------------

    def _val_batch(self, size: int) -> Triples:
        idx = self.rng.integers(0, len(self.val_u), size=size)
        u = self.val_u[idx]
        return Triples(u, self.val_i[idx], self.all_pos.sample_negatives(u, self.rng))

    def _controller_step(self, train_b: Triples) -> None:
        val_b = self._val_batch(len(train_b))
        lb = localise(train_b, val_b)
        second = self.cfg.hypergradient == "second_order"
        obj = self.model.unrolled_objective(lb, second_order=second)
        grads = torch.autograd.grad(obj, self.model.controller)
        for p, g in zip(self.model.controller, grads, strict=True):
            p.grad = g
        self.ctrl_opt.step()

    def _weight_step(self, train_b: Triples) -> float:
        lb = localise(train_b)
        w = self.model.gather(lb, requires_grad=True)
        loss, mean, var = self.model.train_loss(lb, w)
        grads = torch.autograd.grad(loss, w)
        self.item_opt.step(lb.item_rows, grads[0])
        self.user_opt.step(lb.user_rows, grads[1])
        if self.mlp_opt is not None:
            for p, g in zip(self.model.mlp, grads[2:], strict=True):
                p.grad = g
            self.mlp_opt.step()
        self.model.update_running_stats(mean, var, 2 * len(train_b))
        value = float(loss.detach())
        self.model.last_loss = value
        return value

    def run_epoch(self, epoch: int) -> float:
        order = self.rng.permutation(len(self.train_u))
        self.model.refresh_budget_masks()
        bs = self.cfg.batch_size
        total, steps = 0.0, 0
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            u = self.train_u[idx]
            batch = Triples(u, self.train_i[idx], self.train_pos.sample_negatives(u, self.rng))
            if len(self.val_u) and self.cfg.importance == "controller":
                self._controller_step(batch)
            total += self._weight_step(batch)
            steps += 1
        return total / max(steps, 1)

    # -- evaluation ----------------------------------------------------------------------

    @torch.no_grad()
    def val_loss(self) -> float | None:
        if self.val_fixed is None:
            return None
        lb = localise(self.val_fixed)
        alpha = self.model.alpha()
        blocks = self.model.deployed_blocks()[lb.item_rows]
        u, p, n = lb.parts[0]
        weighted = blocks * alpha[self.model.item_group[lb.item_rows]].unsqueeze(-1)
        users = self.model.users[lb.user_rows][u]
        scores_p = self.model._score(users, weighted[p], self.model.mlp)
        scores_n = self.model._score(users, weighted[n], self.model.mlp)
        return float(bpr(scores_p, scores_n))

    @torch.no_grad()
    def deployed_metrics(self, fraction: float = 1.0) -> dict[str, float]:
        if self.task.valid.nnz == 0:
            return {}
        res = evaluate_group_deployed(
            self.data, self.local_users, self.model.users.float().numpy(),
            self.model.deployed_blocks().float(), self.model.importance().float().numpy(),
            self.task.item_group, self.cfg.similarity, fraction, "valid", self.eval_subset,
            scale=self.cfg.scale, group=self.task.group)
        return res.metrics

    def _validate(self, rec: dict[str, Any], has_valid: bool) -> dict[str, Any]:
        """Add the validation loss and deployed validation metrics to an epoch's record."""
        rec["valid_loss"] = self.val_loss()
        if not has_valid:
            return rec
        rec["valid"] = self.deployed_metrics()
        if self.cfg.early_stop == "recall":
            rec["budget_recall@20"] = {
                str(b): (rec["valid"]["recall@20"] if b == 1.0
                         else self.deployed_metrics(b)["recall@20"])
                for b in self.cfg.early_stop_budgets}
        return rec

    def _criterion(self, rec: dict[str, Any]) -> float:
        if self.cfg.early_stop == "recall":
            return float(np.mean(list(rec["budget_recall@20"].values())))
        return -rec["valid_loss"]

    def fit(self) -> dict[str, Any]:
        """Train with early stopping; leaves the model at its best state. Returns the log."""
        cfg = self.cfg
        has_valid = len(self.val_u) > 0
        history: list[dict[str, Any]] = [self._validate({"epoch": 0}, has_valid)]
        # The starting point competes too: fine-tuning that never beats it on validation
        # leaves the pretrained (or rotated) table as it was.
        best_score, best_epoch, bad, best = -math.inf, 0, 0, None
        if has_valid:
            best_score, best = self._criterion(history[0]), self.model.snapshot()
        for epoch in range(1, cfg.max_epochs + 1):
            t0 = time.perf_counter()
            train_loss = self.run_epoch(epoch)
            rec = self._validate({"epoch": epoch, "loss": train_loss,
                                  "train_seconds": time.perf_counter() - t0}, has_valid)
            history.append(rec)
            if not has_valid:
                best, best_epoch = self.model.snapshot(), epoch
                continue
            score = self._criterion(rec)
            if score > best_score:
                best_score, best_epoch, bad, best = score, epoch, 0, self.model.snapshot()
            else:
                bad += 1
                if bad >= cfg.patience:
                    break
        if best is not None:
            self.model.restore(best)
        return {"history": history, "best_epoch": best_epoch,
                "valid": self.deployed_metrics(),
                "valid_budget20": self.deployed_metrics(0.2),
                "epochs": len(history) - 1}


def train_group(task: GroupTask) -> GroupSummary:
    """Fine-tune one user group and write its npz + JSON atomically (the executor's task)."""
    from peel.executor import deterministic_torch, torch_threads

    t0 = time.perf_counter()
    task.cfg.validate()
    with torch_threads(task.cfg.threads), deterministic_torch():
        trainer = _Trainer(task)
        result = trainer.fit()
        model = trainer.model
        arrays = {
            "blocks": model.deployed_blocks().numpy().astype(np.float32),
            "alpha": model.importance().detach().numpy().astype(np.float32),
            "item_group": np.asarray(task.item_group, dtype=np.int32),
            "users": np.asarray(task.users, dtype=np.int64),
            "user_emb": model.users.numpy().astype(np.float32),
        }
    seconds = time.perf_counter() - t0
    save_npz(task.npz_path, arrays)
    write_json(task.json_path, {
        "group": task.group,
        "fingerprint": task.fingerprint,
        "seed": task.seed,
        "n_users": len(task.users),
        "n_train": int(task.train.nnz),
        "n_valid": int(task.valid.nnz),
        "config": asdict(task.cfg),
        "alpha_note": _ALPHA_NOTE[task.cfg.alpha_scale],
        "blocks_note": "eval-mode batch-norm (running statistics) + tanh; alpha not folded in",
        "context": trainer.model.context.tolist(),
        "best_epoch": result["best_epoch"],
        "epochs": result["epochs"],
        "valid": result["valid"],
        "valid_budget20": result["valid_budget20"],
        "valid_users_evaluated": (len(trainer.eval_subset) if trainer.eval_subset is not None
                                  else int((task.valid.getnnz(axis=1) > 0).sum())),
        "seconds": seconds,
        "history": result["history"],
    })
    return GroupSummary(task.group, len(task.users), int(task.train.nnz), int(task.valid.nnz),
                        result["epochs"], result["best_epoch"], result["valid"], seconds,
                        task.npz_path, False, result["history"])


_ALPHA_NOTE = {
    "literal": "softmax over all G_v*N weights; alpha.sum() == 1",
    "global": "softmax over all G_v*N weights times G_v*N; alpha.sum() == G_v*N (mean 1)",
    "per_group": "softmax within each item group times N; every row sums to N",
}


# ---------------------------------------------------------------------------------------------
# All groups
# ---------------------------------------------------------------------------------------------


def array_digest(*arrays: np.ndarray) -> str:
    """Content hash of arrays (dtype, shape and bytes)."""
    h = hashlib.sha256()
    for arr in arrays:
        a = np.ascontiguousarray(arr)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def task_fingerprint(cfg: FinetuneConfig, seed: int, shared_digest: str, users: np.ndarray,
                     user_emb: np.ndarray) -> str:
    """Hash of everything that determines a group's output, so resume never reuses stale work.

    ``shared_digest`` covers the inputs all groups share (item table, item groups), hashed once.
    """
    h = hashlib.sha256()
    h.update(json.dumps({"cfg": asdict(cfg), "seed": seed, "shared": shared_digest},
                        sort_keys=True).encode())
    h.update(array_digest(users, user_emb).encode())
    return h.hexdigest()[:32]


def load_group(path: str | Path) -> dict[str, np.ndarray]:
    """Arrays of one group file (no pickle), checked for the documented keys and shapes."""
    arrays = load_npz(path)
    missing = [k for k in GROUP_ARRAYS if k not in arrays]
    if missing:
        raise ValueError(f"{path}: missing arrays {missing}; expected {list(GROUP_ARRAYS)}")
    blocks, alpha = arrays["blocks"], arrays["alpha"]
    n_items = blocks.shape[0]
    ok = (blocks.ndim == 3 and alpha.ndim == 2 and alpha.shape[1] == blocks.shape[1]
          and arrays["item_group"].shape == (n_items,)
          and arrays["user_emb"].shape == (len(arrays["users"]), blocks.shape[1] * blocks.shape[2])
          and int(arrays["item_group"].max(initial=0)) < alpha.shape[0])
    if not ok:
        shapes = {k: v.shape for k, v in arrays.items()}
        raise ValueError(f"{path}: inconsistent array shapes {shapes}")
    return arrays


def _is_complete(npz: Path, js: Path, fingerprint: str) -> bool:
    if not (npz.exists() and js.exists()):
        return False
    try:
        meta = read_json(js)
        load_group(npz)
    except (OSError, ValueError, KeyError):
        return False
    return meta.get("fingerprint") == fingerprint


def _summary_from_disk(npz: Path, js: Path) -> GroupSummary:
    meta = read_json(js)
    return GroupSummary(meta["group"], meta["n_users"], meta["n_train"], meta["n_valid"],
                        meta["epochs"], meta["best_epoch"], meta["valid"], meta["seconds"],
                        str(npz), True, meta.get("history", []))


def build_tasks(data: InteractionData, user_emb: np.ndarray, item_emb: np.ndarray,
                user_groups: np.ndarray, item_groups: np.ndarray, cfg: FinetuneConfig,
                out_dir: str | Path, seed: int) -> list[GroupTask]:
    """One task per non-empty user group; only train/valid rows travel (never test)."""
    user_groups = np.asarray(user_groups, dtype=np.int64)
    item_groups = np.asarray(item_groups, dtype=np.int64)
    if len(user_groups) != data.n_users or len(item_groups) != data.n_items:
        raise ValueError("user_groups/item_groups must have one entry per user/item")
    if user_emb.shape[0] != data.n_users or item_emb.shape[0] != data.n_items:
        raise ValueError(f"embeddings {user_emb.shape}/{item_emb.shape} do not match the data"
                         f" ({data.n_users} users, {data.n_items} items)")
    if cfg.init == "svd":  # one rotation of the whole model, shared by every group
        rot = svd_rotate(user_emb, item_emb)
        user_emb, item_emb = rot.user_emb, rot.item_emb
    item_emb = np.ascontiguousarray(item_emb, dtype=np.float32)
    shared = array_digest(item_emb, item_groups)
    tasks = []
    for g in np.unique(user_groups):
        users = np.flatnonzero(user_groups == g).astype(np.int64)
        u_emb = np.ascontiguousarray(user_emb[users], dtype=np.float32)
        npz, js = group_paths(out_dir, int(g))
        fp = task_fingerprint(cfg, seed, shared, users, u_emb)
        tasks.append(GroupTask(int(g), users, data.train[users], data.valid[users], u_emb,
                               item_emb, item_groups, cfg, seed, str(npz), str(js), fp))
    return tasks


def finetune_groups(data: InteractionData, user_emb: np.ndarray, item_emb: np.ndarray,
                    user_groups: np.ndarray, item_groups: np.ndarray, cfg: FinetuneConfig,
                    out_dir: str | Path, executor: Any = None, seed: int = 2024
                    ) -> list[GroupSummary]:
    """Fine-tune every user group (in parallel through ``executor``), resuming finished ones.

    A group whose files exist with the same fingerprint (config, seed, inputs) is skipped.
    Groups are submitted largest first so parallel workers finish close together; summaries
    come back ordered by group id.
    """
    from peel.executor import SerialExecutor

    cfg.validate()
    tasks = build_tasks(data, user_emb, item_emb, user_groups, item_groups, cfg, out_dir, seed)
    done: dict[int, GroupSummary] = {}
    todo = []
    for t in tasks:
        npz, js = Path(t.npz_path), Path(t.json_path)
        if _is_complete(npz, js, t.fingerprint):
            done[t.group] = _summary_from_disk(npz, js)
        else:
            todo.append(t)
    if done:
        log.info("resuming: %d of %d groups already complete", len(done), len(tasks))
    todo.sort(key=lambda t: (-t.train.nnz, t.group))
    executor = executor if executor is not None else SerialExecutor()
    labels = [f"g{t.group:03d}" for t in todo]
    if todo:  # the item table and item groups are every task's: sent once, not per group
        shared = SharedTables(todo[0].item_emb, todo[0].item_group)
        light = [replace(t, item_emb=_NOT_SENT, item_group=_NOT_SENT) for t in todo]
        for summary in executor.map(train_group_shared, light, labels=labels, shared=shared):
            _check_visible(summary)
            done[summary.group] = summary
    return [done[g] for g in sorted(done)]


@dataclass(frozen=True)
class SharedTables:
    """What every group's task reads: the (rotated) pretrained item table and item groups."""

    item_emb: np.ndarray
    item_group: np.ndarray


#: Stands in for the shared tables in a task sent without them (never trained on).
_NOT_SENT = np.empty(0, dtype=np.float32)


def train_group_shared(task: GroupTask, shared: SharedTables) -> GroupSummary:
    """:func:`train_group` for a task sent without the tables all groups share.

    The item table is used as received (it may be a read-only view of Ray's object store;
    training copies it into its own tensor); the small item-group array is copied because
    torch warns on wrapping read-only arrays.
    """
    return train_group(replace(task, item_emb=shared.item_emb,
                               item_group=np.array(shared.item_group)))


def _check_visible(summary: GroupSummary) -> None:
    """A worker on another machine writes where *it* sees the run folder: refuse to go on
    when this machine cannot see the file (a cluster without a shared filesystem)."""
    if not Path(summary.path).exists():
        raise OutputError(f"{summary.path}: group {summary.group} was written by a worker but "
                      "this machine cannot see the file; on a multi-node cluster put the run "
                      "folder on a filesystem every node shares")
