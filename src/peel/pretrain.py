"""Stage 1: full-embedding pretraining (paper Section IV-B).

LightGCN (Eq. 1) trained with BPR plus the diversity-driven block regularizer (Eq. 2). With
``layers=0`` the same trainer is BPR matrix factorisation, the fixed-size PMF-style baseline.

Why it is fast on a CPU: the reference LightGCN code re-propagates the whole graph for every
2048-interaction batch with a COO sparse kernel. Propagation is linear and cheap with CSR kernels
on the bipartite halves (user->item and item->user), so we keep full-graph propagation per step
(exactly LightGCN's model) but take larger batches with several negatives per positive and a
larger learning rate, which reaches the same quality in far fewer propagations.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from safetensors.numpy import load_file as load_np_tensors
from safetensors.numpy import save_file as save_np_tensors

from peel.data import InteractionData
from peel.eval import dot_scorer, evaluate, selection_recall
from peel.executor import deterministic_torch
from peel.io import atomic_path, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    """Every knob of stage 1. Defaults: the paper's N=16 blocks of d=8 (D=128), 3 layers."""

    dim: int = 128
    block_dim: int = 8  # d; dim must be a multiple of it (N = dim / d blocks)
    layers: int = 3  # 0 = BPR matrix factorisation
    layer_combination: str = "mean"  # "mean" (LightGCN paper) | "last" (PEEL paper, literal)
    epochs: int = 300
    batch_size: int = 8192  # positive interactions per step
    negatives: int = 1  # sampled negatives per positive (BPR averaged over them)
    # "dns" = hardest of dns_candidates uniform draws; measured better than uniform (paper-notes)
    sampling: str = "dns"  # "uniform" | "dns"
    dns_candidates: int = 32
    lr: float = 1e-2
    # Exponential decay in optimiser steps (so it means the same on any dataset size); hard
    # negatives overfit at a constant high rate. 0 = constant.
    lr_half_life: int = 375
    l2: float = 1e-4  # LightGCN's weight on the batch's ego embeddings
    diversity: float = 0.1  # lambda of Eq. 2 (normalised mode; 0 = "w/o Regularizer")
    diversity_mode: str = "normalized"  # "normalized" | "literal" (unbounded, see docs)
    init_std: float = 0.1
    # Matryoshka prefixes (Kusupati et al. 2022; MRL4Rec): the BPR loss is averaged over the
    # full embedding and its first k dimensions for each k here, so that small prefixes are
    # trained to rank on their own. () = the full embedding only (LightGCN, the paper).
    nested_dims: tuple[int, ...] = ()
    eval_every: int = 1
    patience: int = 5  # evaluations without a new best val. Recall@20 (paper-notes)
    # `peel train`'s stage 1 tuned on validation like the baselines (peel.tuning.tune_stage1):
    # trial 0 is this config, trials 1.. the LightGCN baseline's own draws. 1 = no tuning.
    trials: int = 1
    eval_batch_size: int = 1024
    max_minutes: float | None = None  # wall-clock cap, for benchmarks
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 2024

    @property
    def n_blocks(self) -> int:
        return self.dim // self.block_dim

    def validate(self) -> None:
        if self.dim <= 0 or self.block_dim <= 0 or self.dim % self.block_dim:
            raise ValueError(f"dim={self.dim} must be a positive multiple of block_dim="
                             f"{self.block_dim}")
        if self.layers < 0:
            raise ValueError("layers must be >= 0")
        if self.layer_combination not in ("mean", "last"):
            raise ValueError("layer_combination must be 'mean' or 'last'")
        if self.sampling not in ("uniform", "dns"):
            raise ValueError("sampling must be 'uniform' or 'dns'")
        if self.diversity_mode not in ("normalized", "literal"):
            raise ValueError("diversity_mode must be 'normalized' or 'literal'")
        if self.lr_half_life < 0:
            raise ValueError("lr_half_life must be >= 0 optimiser steps (0 = constant rate)")
        if not all(0 < k < self.dim for k in self.nested_dims):
            raise ValueError(f"nested_dims {self.nested_dims}: every prefix must lie in "
                             f"(0, dim={self.dim})")
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise ValueError(f"trials {self.trials!r}: expected an integer >= 1 (1 = stage 1 "
                             "not tuned), e.g. --set pretrain.trials=4")
        if self.batch_size < 1 or self.negatives < 1 or self.epochs < 0:
            raise ValueError("batch_size, negatives must be >= 1 and epochs >= 0")
        if isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            # torch.manual_seed failed with "Overflow when unpacking long long" beyond this
            raise ValueError(f"seed {self.seed!r}: expected an integer in [0, 2^63), e.g. "
                             "--seed 7")


@dataclass
class PretrainResult:
    """The full embeddings every later stage starts from, plus how they were obtained."""

    user_emb: np.ndarray
    item_emb: np.ndarray
    config: PretrainConfig
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = -1
    valid_metrics: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Graph propagation (Eq. 1)
# ---------------------------------------------------------------------------------------------


def normalized_interactions(train: sp.csr_matrix) -> sp.csr_matrix:
    """R_hat = D_u^-1/2 R D_i^-1/2: the off-diagonal block of LightGCN's normalised adjacency."""
    r = train.tocsr().astype(np.float32)
    du = np.asarray(r.sum(axis=1)).ravel()
    di = np.asarray(r.sum(axis=0)).ravel()
    su = np.zeros_like(du)
    si = np.zeros_like(di)
    su[du > 0] = du[du > 0] ** -0.5
    si[di > 0] = di[di > 0] ** -0.5
    out = sp.diags(su) @ r @ sp.diags(si)
    out = out.tocsr().astype(np.float32)
    out.sort_indices()
    return out


def _to_torch_csr(m: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta" notices
        return _csr_tensor(m, device)


def _csr_tensor(m: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    return torch.sparse_csr_tensor(
        torch.from_numpy(m.indptr.astype(np.int64)),
        torch.from_numpy(m.indices.astype(np.int64)),
        torch.from_numpy(m.data.astype(np.float32)),
        size=m.shape,
        device=device,
        check_invariants=False,
    )


class _SpMM(torch.autograd.Function):
    """y = M x with the transpose kept explicitly, so backward is another fast CSR product."""

    @staticmethod
    def forward(ctx: Any, m: torch.Tensor, mt: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.mt = mt
        return m @ x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, torch.Tensor]:
        return None, None, ctx.mt @ grad


class Propagator:
    """LightGCN propagation over the bipartite graph; combine layers by mean or take the last."""

    def __init__(self, train: sp.csr_matrix, layers: int, combination: str,
                 device: torch.device) -> None:
        r = normalized_interactions(train)
        self.r = _to_torch_csr(r, device)
        self.rt = _to_torch_csr(r.T.tocsr(), device)
        self.layers = layers
        self.combination = combination

    def __call__(self, users: torch.Tensor, items: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layers == 0:
            return users, items
        acc_u, acc_i = users, items
        u, i = users, items
        for _ in range(self.layers):
            u, i = _SpMM.apply(self.r, self.rt, i), _SpMM.apply(self.rt, self.r, u)
            if self.combination == "mean":
                acc_u, acc_i = acc_u + u, acc_i + i
        if self.combination == "last":
            return u, i
        scale = 1.0 / (self.layers + 1)
        return acc_u * scale, acc_i * scale


# ---------------------------------------------------------------------------------------------
# Loss pieces (Eq. 2)
# ---------------------------------------------------------------------------------------------


def block_pairwise_sq_distance(items: torch.Tensor, n_blocks: int,
                               normalized: bool) -> torch.Tensor:
    """Mean over block pairs of ||E^n1 - E^n2||_F^2, E^n = block n of every item.

    Uses sum_{a<b} ||x_a - x_b||^2 = N sum_a ||x_a||^2 - ||sum_a x_a||^2, so it costs one pass
    over the table instead of N^2/2. With ``normalized`` each block is scaled to unit Frobenius
    norm first, which bounds the term in [0, 4] per pair and makes it scale-free.
    """
    blocks = items.reshape(items.shape[0], n_blocks, -1).transpose(0, 1)  # (N, |V|, d)
    if normalized:
        norms = blocks.pow(2).sum(dim=(1, 2), keepdim=True).clamp_min(1e-12).sqrt()
        blocks = blocks / norms
    total = n_blocks * blocks.pow(2).sum() - blocks.sum(dim=0).pow(2).sum()
    pairs = n_blocks * (n_blocks - 1) / 2
    return total / max(pairs, 1.0)


def mean_block_distance(item_emb: np.ndarray, block_dim: int, normalized: bool = True) -> float:
    """Diversity of a finished table: the same quantity, for reports and tests."""
    t = torch.from_numpy(np.ascontiguousarray(item_emb, dtype=np.float32))
    return float(block_pairwise_sq_distance(t, item_emb.shape[1] // block_dim, normalized))


def bpr_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """-ln sigma(y_pos - y_neg), averaged; ``neg`` may carry several negatives per positive."""
    return torch.nn.functional.softplus(neg - pos.unsqueeze(-1)).mean()


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


class NegativeSampler:
    """Uniform negatives, vectorised; hits on the user's positives are redrawn a few times.

    Membership ("is this (user, item) a training positive?") is the sampler's hot path: DNS
    asks it for 32 candidates per positive, and a binary search over the sorted pair keys took
    a third of a gowalla epoch. When the users x items bit matrix fits in ``bitset_limit``
    bytes (gowalla: 153 MB) it is one memory read per query instead; both answer identically,
    so the negatives drawn for a seed do not depend on which one is used.
    """

    #: Largest users x items bit matrix (bytes) kept for membership tests.
    bitset_limit: int = 256 * 2**20

    def __init__(self, train: sp.csr_matrix, bitset_limit: int | None = None) -> None:
        coo = train.tocoo()
        self.n_items = train.shape[1]
        self.keys = np.sort(coo.row.astype(np.int64) * self.n_items + coo.col)
        limit = self.bitset_limit if bitset_limit is None else bitset_limit
        self.row_bytes = -(-self.n_items // 8)
        self.bits: np.ndarray | None = None
        if train.shape[0] * self.row_bytes <= limit:
            bits = np.zeros(train.shape[0] * self.row_bytes, dtype=np.uint8)
            flat = coo.row.astype(np.int64) * self.row_bytes + (coo.col >> 3)
            np.bitwise_or.at(bits, flat, (1 << (coo.col & 7)).astype(np.uint8))
            self.bits = bits

    def is_positive(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        if self.bits is not None:
            items = np.asarray(items, dtype=np.int64)
            byte = self.bits[users.astype(np.int64) * self.row_bytes + (items >> 3)]
            return ((byte >> (items & 7).astype(np.uint8)) & 1).astype(bool)
        q = users.astype(np.int64) * self.n_items + items
        if not len(self.keys):
            return np.zeros(q.shape, dtype=bool)
        pos = np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)
        return self.keys[pos] == q

    def sample(self, users: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        u = np.repeat(users[:, None], k, axis=1)
        items = rng.integers(0, self.n_items, size=u.shape)
        # Only redrawn entries can change, so each round re-tests those alone; the draws (and
        # so the negatives) are the same as re-testing every entry each round.
        bad = np.flatnonzero(self.is_positive(u, items))
        for _ in range(5):
            if not len(bad):
                return items
            flat = items.reshape(-1)
            flat[bad] = rng.integers(0, self.n_items, size=len(bad))
            bad = bad[self.is_positive(u.reshape(-1)[bad], flat[bad])]
        if len(bad):
            self._fix_dense_users(u, items, rng)
        return items

    def _fix_dense_users(self, u: np.ndarray, items: np.ndarray,
                         rng: np.random.Generator) -> None:
        """Users who have most of the catalogue: draw from their complement explicitly.

        Rare (only after five rejection rounds), so the per-user loop is off the hot path.
        """
        bad = self.is_positive(u, items)
        for user in np.unique(u[bad]):
            lo, hi = np.searchsorted(self.keys, [user * self.n_items, (user + 1) * self.n_items])
            free = np.setdiff1d(np.arange(self.n_items), self.keys[lo:hi] - user * self.n_items)
            where = bad & (u == user)
            if len(free):
                items[where] = rng.choice(free, size=int(where.sum()))


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available; use device "
                         "'cpu' (--device cpu)")
    return torch.device(name)


class Model(torch.nn.Module):
    """Ego embeddings; the propagated ones are what every later stage uses."""

    def __init__(self, n_users: int, n_items: int, dim: int, std: float,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.user = torch.nn.Parameter(torch.randn(n_users, dim, generator=generator) * std)
        self.item = torch.nn.Parameter(torch.randn(n_items, dim, generator=generator) * std)


@dataclass
class _State:
    epoch: int = 0
    best_recall: float = -1.0
    best_epoch: int = -1
    bad_evals: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0


# Called after every epoch with the log record and, on evaluation epochs, the embeddings that
# were just validated (benchmarks use it to trace test quality without affecting training).
ProgressHook = Callable[[dict[str, Any], "tuple[np.ndarray, np.ndarray] | None"], None]


def pretrain(data: InteractionData, cfg: PretrainConfig, out_dir: str | Path | None = None,
             progress: bool = True, on_eval: ProgressHook | None = None) -> PretrainResult:
    """Train and return the best (validation Recall@20) embeddings.

    With ``out_dir`` a checkpoint is written every epoch and an interrupted run resumes from it.
    Every epoch draws its samples from ``(seed, epoch)``, so a resumed run equals an
    uninterrupted one.
    """
    with deterministic_torch():
        return _pretrain(data, cfg, out_dir, progress, on_eval)


def _pretrain(data: InteractionData, cfg: PretrainConfig, out_dir: str | Path | None,
              progress: bool, on_eval: ProgressHook | None) -> PretrainResult:
    cfg.validate()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = Model(data.n_users, data.n_items, cfg.dim, cfg.init_std, gen).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    prop = Propagator(data.train, cfg.layers, cfg.layer_combination, device)
    sampler = NegativeSampler(data.train)
    train = data.train.tocoo()
    pos_u, pos_i = train.row.astype(np.int64), train.col.astype(np.int64)
    has_valid = data.valid.nnz > 0
    out = Path(out_dir) if out_dir is not None else None
    state = _State()
    best = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        resumed = _load_checkpoint(out, cfg, model, opt)
        if resumed is not None:
            state, best = resumed
            log.info("resuming pretraining at epoch %d", state.epoch)
    bar = _progress_bar(cfg.epochs, state.epoch, progress)
    t_start = time.perf_counter() - state.elapsed
    while state.epoch < cfg.epochs:
        epoch = state.epoch
        t0 = time.perf_counter()
        loss = _train_epoch(model, opt, prop, sampler, pos_u, pos_i, cfg, epoch, device)
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": loss,
                                  "seconds": time.perf_counter() - t0}
        state.epoch += 1
        stop = False
        evaluated = None
        if has_valid and (state.epoch % cfg.eval_every == 0 or state.epoch == cfg.epochs):
            u_emb, i_emb = _final_embeddings(model, prop)
            metrics = evaluate(device_scorer(u_emb, i_emb, device), data, "valid",
                               batch_size=cfg.eval_batch_size).metrics
            record["valid"] = metrics
            evaluated = (u_emb, i_emb)
            if selection_recall(metrics) > state.best_recall:
                state.best_recall, state.best_epoch, state.bad_evals = (
                    selection_recall(metrics), state.epoch, 0)
                best = (u_emb, i_emb)
            else:
                state.bad_evals += 1
                stop = state.bad_evals >= cfg.patience
        state.elapsed = time.perf_counter() - t_start
        record["elapsed"] = state.elapsed
        state.history.append(record)
        if on_eval is not None:
            on_eval(record, evaluated)
        if cfg.max_minutes is not None and state.elapsed > 60 * cfg.max_minutes:
            stop = True
        if out is not None:
            _save_checkpoint(out, cfg, model, opt, state, best)
        bar.update(1)
        bar.set_postfix(_postfix(record, state))
        if stop:
            break
    bar.close()
    if best is None:
        best = _final_embeddings(model, prop)
        state.best_epoch = state.epoch
    valid = {}
    for rec in state.history:
        if rec.get("valid") and rec["epoch"] == state.best_epoch:
            valid = rec["valid"]
    return PretrainResult(best[0], best[1], cfg, state.history, state.best_epoch, valid)


def _train_epoch(model: Model, opt: torch.optim.Optimizer, prop: Propagator,
                 sampler: NegativeSampler, pos_u: np.ndarray, pos_i: np.ndarray,
                 cfg: PretrainConfig, epoch: int, device: torch.device) -> float:
    rng = np.random.default_rng([cfg.seed, epoch])
    order = rng.permutation(len(pos_u))
    total, steps = 0.0, 0
    steps_per_epoch = -(-len(order) // cfg.batch_size)
    draws = cfg.negatives * (cfg.dns_candidates if cfg.sampling == "dns" else 1)
    for start in range(0, len(order), cfg.batch_size):
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, epoch * steps_per_epoch + steps)
        idx = order[start : start + cfg.batch_size]
        u_np, p_np = pos_u[idx], pos_i[idx]
        n_np = sampler.sample(u_np, draws, rng)
        u = torch.from_numpy(u_np).to(device)
        p = torch.from_numpy(p_np).to(device)
        n = torch.from_numpy(n_np).to(device)
        loss = _batch_loss(model, prop, u, p, n, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach())
        steps += 1
    return total / max(steps, 1)


def learning_rate(cfg: PretrainConfig, step: int) -> float:
    if cfg.lr_half_life == 0:
        return cfg.lr
    return cfg.lr * 0.5 ** (step / cfg.lr_half_life)


def _batch_loss(model: Model, prop: Propagator, u: torch.Tensor, p: torch.Tensor,
                n: torch.Tensor, cfg: PretrainConfig) -> torch.Tensor:
    all_u, all_i = prop(model.user, model.item)
    eu = all_u[u]
    if cfg.sampling == "dns":
        n = _hardest(eu.detach(), all_i.detach(), n, cfg.negatives)
    if cfg.nested_dims:
        loss = _nested_bpr(eu, all_i[p], all_i[n], cfg.nested_dims)
    else:
        pos = (eu * all_i[p]).sum(-1)
        neg = torch.einsum("bd,bkd->bk", eu, all_i[n])
        loss = bpr_loss(pos, neg)
    ego = (model.user[u].pow(2).sum() + model.item[p].pow(2).sum()
           + model.item[n].pow(2).sum() / n.shape[1])
    loss = loss + cfg.l2 * 0.5 * ego / len(u)
    if cfg.diversity > 0:
        dist = block_pairwise_sq_distance(all_i, cfg.n_blocks, cfg.diversity_mode == "normalized")
        if cfg.diversity_mode == "literal":
            dist = dist / all_i.shape[0]  # per item, so lambda means the same at any |V|
        loss = loss - cfg.diversity * dist
    return loss


def _nested_bpr(eu: torch.Tensor, ip: torch.Tensor, inn: torch.Tensor,
                nested: tuple[int, ...]) -> torch.Tensor:
    """Mean BPR loss of the full embedding and of each prefix: a prefix's score is a partial
    sum of the per-dimension products, so one cumulative sum gives every prefix at once."""
    cols = torch.tensor([k - 1 for k in nested] + [eu.shape[1] - 1])
    pos = torch.cumsum(eu * ip, dim=-1)[:, cols]  # (b, P)
    neg = torch.cumsum(eu.unsqueeze(1) * inn, dim=-1)[..., cols]  # (b, K, P)
    return torch.stack([bpr_loss(pos[:, j], neg[..., j]) for j in range(len(cols))]).mean()


def _hardest(eu: torch.Tensor, items: torch.Tensor, cand: torch.Tensor, k: int) -> torch.Tensor:
    """Dynamic negative sampling: keep the k highest-scored of the uniform candidates."""
    scores = torch.einsum("bd,bmd->bm", eu, items[cand])
    top = torch.topk(scores, k, dim=1).indices
    return torch.gather(cand, 1, top)


def device_scorer(u_emb: np.ndarray, i_emb: np.ndarray, device: torch.device) -> Any:
    """Score on the training device: on a GPU the per-epoch validation ranking (a full
    users x items product and top-K) would otherwise run on the CPU and dominate the epoch."""
    if device.type == "cpu":
        return dot_scorer(u_emb, i_emb)
    return dot_scorer(torch.from_numpy(u_emb).to(device), torch.from_numpy(i_emb).to(device))


def _final_embeddings(model: Model, prop: Propagator) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        u, i = prop(model.user, model.item)
    return (u.detach().cpu().numpy().astype(np.float32, copy=True),
            i.detach().cpu().numpy().astype(np.float32, copy=True))


def _postfix(record: dict[str, Any], state: _State) -> dict[str, str]:
    post = {"loss": f"{record['loss']:.4f}"}
    if "valid" in record:
        post["val_R@20"] = f"{selection_recall(record['valid']):.4f}"
    post["best"] = f"{max(state.best_recall, 0):.4f}@{state.best_epoch}"
    return post


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="pretrain", unit="ep", disable=not enabled,
                dynamic_ncols=True, leave=False)


# ---------------------------------------------------------------------------------------------
# Checkpoint / resume (safetensors + JSON; no pickle)
# ---------------------------------------------------------------------------------------------

#: settings that say how long or where stage 1 runs, not what it learns: a run may be resumed
#: with other values (a longer epoch cap, a wall-clock cap, another device)
RESUMABLE_FIELDS = frozenset({"epochs", "max_minutes", "patience", "eval_every", "device",
                              "eval_batch_size"})

_CKPT = "checkpoint.safetensors"
_CKPT_META = "checkpoint.json"


def _save_checkpoint(out: Path, cfg: PretrainConfig, model: Model, opt: torch.optim.Optimizer,
                     state: _State, best: tuple[np.ndarray, np.ndarray] | None) -> None:
    tensors = {
        "user": model.user.detach().cpu().numpy(),
        "item": model.item.detach().cpu().numpy(),
    }
    for name, param in (("user", model.user), ("item", model.item)):
        st = opt.state.get(param, {})
        if st:
            tensors[f"adam_{name}_m"] = st["exp_avg"].cpu().numpy()
            tensors[f"adam_{name}_v"] = st["exp_avg_sq"].cpu().numpy()
            tensors[f"adam_{name}_step"] = np.asarray([float(st["step"])], dtype=np.float64)
    if best is not None:
        tensors["best_user"], tensors["best_item"] = best
    with atomic_path(out / _CKPT) as tmp:
        save_np_tensors(tensors, str(tmp))
    meta = {"config": asdict(cfg), "state": asdict(state)}
    write_json(out / _CKPT_META, meta)


def _load_checkpoint(out: Path, cfg: PretrainConfig, model: Model, opt: torch.optim.Optimizer
                     ) -> tuple[_State, tuple[np.ndarray, np.ndarray] | None] | None:
    if not (out / _CKPT).exists() or not (out / _CKPT_META).exists():
        return None
    meta = json.loads((out / _CKPT_META).read_text())
    saved = meta["config"]
    mine = json.loads(json.dumps(asdict(cfg)))
    diff = {k for k in mine if k not in RESUMABLE_FIELDS and saved.get(k) != mine[k]}
    if diff:
        raise ValueError(
            f"{out / _CKPT_META}: checkpoint was made with a different config ({sorted(diff)});"
            " use a new --out folder or delete the checkpoint to start over"
        )
    tensors = load_np_tensors(str(out / _CKPT))
    with torch.no_grad():
        model.user.copy_(torch.from_numpy(tensors["user"]))
        model.item.copy_(torch.from_numpy(tensors["item"]))
    for name, param in (("user", model.user), ("item", model.item)):
        if f"adam_{name}_m" in tensors:
            opt.state[param] = {
                "step": torch.tensor(float(tensors[f"adam_{name}_step"][0])),
                "exp_avg": torch.from_numpy(tensors[f"adam_{name}_m"]).to(param.device),
                "exp_avg_sq": torch.from_numpy(tensors[f"adam_{name}_v"]).to(param.device),
            }
    state = _State(**meta["state"])
    best = None
    if "best_user" in tensors:
        best = (tensors["best_user"], tensors["best_item"])
    return state, best


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def save_result(result: PretrainResult, out_dir: str | Path,
                test_metrics: dict[str, float] | None = None) -> None:
    """user_emb / item_emb (safetensors), training log and resolved config (JSON)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "embeddings.safetensors") as tmp:
        save_np_tensors({"user_emb": result.user_emb, "item_emb": result.item_emb}, str(tmp),
                        metadata=_header(result.config))
    write_json(out / "pretrain_log.json", {
        "best_epoch": result.best_epoch,
        "valid": result.valid_metrics,
        "test": test_metrics or {},
        "history": result.history,
    })
    write_json(out / "pretrain_config.json", asdict(result.config))


def check_saved_config(stage: str | Path, cfg: PretrainConfig) -> None:
    """Refuse stage-1 outputs in ``stage`` that were not made with ``cfg``, naming the fields.

    Fields that only say how long training may run (RESUMABLE_FIELDS) are not compared: they
    do not change what finished embeddings are. A setting added after the files were written is
    absent from them; its default is the behaviour they were made with (new settings default
    to what came before).
    """
    path = Path(stage) / "pretrain_config.json"
    if not path.exists():
        raise ValueError(f"{path}: missing; these embeddings cannot be checked against the "
                         "configuration; delete the pretrain folder to retrain")
    saved = json.loads(path.read_text())
    wanted = json.loads(json.dumps(asdict(cfg), default=str))
    defaults = json.loads(json.dumps(asdict(PretrainConfig()), default=str))
    saved = {**{k: defaults[k] for k in defaults.keys() - saved.keys()}, **saved}
    saved, wanted = ({k: v for k, v in d.items() if k not in RESUMABLE_FIELDS}
                     for d in (saved, wanted))
    if saved != wanted:
        diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise ValueError(f"{path}: pretrained with different settings ({', '.join(diff)}); "
                         "train into a new folder or use the same [pretrain] settings")


def _header(cfg: PretrainConfig) -> dict[str, str]:
    """One metadata key: safetensors writes a multi-key map in hash order, so the same run
    would give files that differ byte for byte."""
    return {"peel": json.dumps({"dim": cfg.dim, "block_dim": cfg.block_dim}, sort_keys=True)}


def load_embeddings(run_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    path = Path(run_dir) / "embeddings.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no pretrained embeddings; run `peel pretrain` first")
    tensors = load_np_tensors(str(path))
    return tensors["user_emb"], tensors["item_emb"]


def with_overrides(cfg: PretrainConfig, **overrides: Any) -> PretrainConfig:
    """Apply only the overrides that were actually given (None means 'keep')."""
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})

