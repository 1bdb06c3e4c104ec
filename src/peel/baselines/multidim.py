"""What ESAPN and AutoEmb share: per-size tables, lifting to d dims, the search loop, the
device-ranked recommender.

Both methods give each user and item one embedding size from a candidate list (2, 4, 8, 16,
64, 128 at d = 128) and lift every size to d dims so that all items compare with one user
vector. Their reference code (zgahhblhc/ESAPN, which also holds the AutoEmb baseline) keeps,
for every user and item, one row in *every* size's table, and uses the row of the size chosen
(ESAPN) or a softmax-weighted mix of all of them (AutoEmb); the same here, on the server. What
the device receives is only each item's row at its final size (:mod:`peel.device_multidim`).

Change from the papers, the same for both (``docs/paper-notes.md``, "ESAPN and AutoEmb"): the
papers' predictor is a CTR MLP over the concatenated user and item vectors trained on rating
streams; here the score is the dot product of the lifted user and item vectors, trained with
BPR (stage 1's negatives: ``cfg.negatives`` per positive, uniform or the hardest of
``dns_candidates`` uniform draws, as configured) on the training split in time-free,
shuffled mini-batches (the papers stream the interactions once, in time order), with
stage 1's optimiser (Adam, learning-rate half-life, L2 on the batch's rows) and early stopping
on validation Recall@20 of the model as deployed. A dot product is what a device ranks with
and what every other method here is scored by; an MLP over (user, item) pairs would cost |V|
MLP passes per ranking.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from peel import device_multidim as dm
from peel.baselines.compressed import CompressedRecommender
from peel.data import InteractionData
from peel.eval import evaluate, selection_recall
from peel.executor import deterministic_torch
from peel.pretrain import NegativeSampler, PretrainConfig, learning_rate

log = logging.getLogger(__name__)

#: Users lifted at once when the user vectors are computed for deployment.
DEPLOY_CHUNK = 8192


def popularity_features(counts: np.ndarray) -> torch.Tensor:
    """(n, 1) standardised log(1 + training interactions): what the controllers read.

    The references embed each raw frequency value (one 32-d row per distinct count); a
    log-scaled scalar carries the same ordering with no table that grows with the data."""
    z = np.log1p(np.asarray(counts, dtype=np.float64))
    z = (z - z.mean()) / (z.std() + 1e-8)
    return torch.from_numpy(z.astype(np.float32)).unsqueeze(1)


def batch_norm(bn: torch.nn.BatchNorm1d, x: torch.Tensor, mode: str) -> torch.Tensor:
    """``mode``: "train" (batch statistics, running statistics updated), "batch" (batch
    statistics, nothing updated: to re-measure a loss without touching the model) or "eval"
    (running statistics, as deployed)."""
    if mode == "train":
        return bn(x)
    if len(x) < 2 and mode == "batch":
        mode = "eval"
    if mode == "batch":
        return torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0,
                                              bn.eps)
    if mode == "eval":
        return torch.nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight,
                                              bn.bias, False, 0.0, bn.eps)
    raise ValueError(f"batch norm mode {mode!r}")


def folded_bn(bn: torch.nn.BatchNorm1d) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) with bn(x) == x * scale + shift in eval mode: what the device stores."""
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
    return (scale.cpu().numpy().astype(np.float32), shift.cpu().numpy().astype(np.float32))


def size_tables(n: int, sizes: tuple[int, ...], std: float,
                generator: torch.Generator) -> torch.nn.ParameterList:
    """One (n, s) table per candidate size, N(0, std)."""
    return torch.nn.ParameterList(
        [torch.nn.Parameter(torch.randn(n, s, generator=generator) * std) for s in sizes])


def class_tables(tables: torch.nn.ParameterList, levels: np.ndarray,
                 sizes: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The device's ``codes`` and ``table_{s}`` (rows of the items of size s, in index order)."""
    out: dict[str, np.ndarray] = {"codes": levels.astype(np.uint8)}
    for k, s in enumerate(sizes):
        items = np.flatnonzero(levels == k)
        if items.size:
            out[f"table_{s}"] = (tables[k].detach()[torch.from_numpy(items)].cpu().numpy()
                                 .astype(np.float32, copy=True))
    return out


def size_histogram(levels: np.ndarray, sizes: tuple[int, ...]) -> dict[str, int]:
    counts = np.bincount(levels, minlength=len(sizes))
    return {str(s): int(c) for s, c in zip(sizes, counts, strict=True)}


class SizeSearch(Protocol):
    """One method's model and search: a training step and the deployed arrays."""

    sizes: tuple[int, ...]

    def train_step(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                   lr: float, rng: np.random.Generator) -> float: ...

    def hardest(self, users: torch.Tensor, cand: torch.Tensor, k: int) -> torch.Tensor: ...

    def start_epoch(self) -> None: ...

    def deploy(self) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]: ...


@dataclass
class SearchResult:
    """The deployed state with the best validation Recall@20, and how it was reached."""

    user_emb: np.ndarray
    arrays: dict[str, np.ndarray]
    info: dict[str, Any]
    best_epoch: int
    valid_metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def run_search(data: InteractionData, cfg: PretrainConfig, model: SizeSearch,
               method: str) -> SearchResult:
    """Shuffled BPR mini-batches over the training split, ``model.train_step`` on each; after
    each epoch (every ``eval_every``) the *deployed* model is ranked on the validation split
    through the device functions, and the best deployment is kept (patience as configured)."""
    with deterministic_torch():
        return _run(data, cfg, model, method)


def _run(data: InteractionData, cfg: PretrainConfig, model: SizeSearch,
         method: str) -> SearchResult:
    t_start = time.perf_counter()
    sampler = NegativeSampler(data.train)
    coo = data.train.tocoo()
    pos_u, pos_i = coo.row.astype(np.int64), coo.col.astype(np.int64)
    best: tuple[float, int, np.ndarray, dict, dict, dict] | None = None
    history: list[dict[str, Any]] = []
    bad, step = 0, 0
    dns = cfg.sampling == "dns"
    draws = cfg.negatives * (cfg.dns_candidates if dns else 1)
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, epoch])
        order = rng.permutation(len(pos_u))
        if dns:
            model.start_epoch()
        total, steps = 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start: start + cfg.batch_size]
            users = torch.from_numpy(pos_u[idx])
            neg = torch.from_numpy(sampler.sample(pos_u[idx], draws, rng))
            if dns:  # stage 1's hard negatives: the best-scored of the uniform candidates
                neg = model.hardest(users, neg, cfg.negatives)
            total += model.train_step(users, torch.from_numpy(pos_i[idx]), neg,
                                      learning_rate(cfg, step), rng)
            steps += 1
            step += 1
        record: dict[str, Any] = {"epoch": epoch, "loss": total / max(steps, 1),
                                  "seconds": time.perf_counter() - t0}
        if data.valid.nnz and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            users, arrays, info = model.deploy()
            metrics = evaluate(_scorer(users, arrays, model.sizes, method), data, "valid",
                               batch_size=cfg.eval_batch_size).metrics
            record["valid"] = metrics
            record["item_sizes"] = info["item_sizes"]
            if best is None or selection_recall(metrics) > best[0]:
                best = (selection_recall(metrics), epoch, users, arrays, info, metrics)
                bad = 0
            else:
                bad += 1
        history.append(record)
        log.info("%s epoch %d loss %.4f valid R@20 %s", method, epoch, record["loss"],
                 record.get("valid", {}).get("recall@20"))
        over_time = (cfg.max_minutes is not None
                     and time.perf_counter() - t_start > 60 * cfg.max_minutes)
        if bad >= cfg.patience or over_time:
            break
    if best is None:  # no validation split (or no epoch): the last state
        users, arrays, info = model.deploy()
        best = (0.0, len(history), users, arrays, info, {})
    return SearchResult(best[2], best[3], best[4], best[1], best[5], history,
                        time.perf_counter() - t_start)


@torch.no_grad()
def hardest_negatives(user_vectors, item_table: torch.Tensor, users: torch.Tensor,
                      cand: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` best-scored of each row's candidate negatives, as
    :func:`peel.pretrain._hardest` does for stage 1: the users' current lifted vectors
    (``user_vectors(ids)``) against ``item_table``, the lifted items as of the start of the
    epoch (lifting every candidate at every step would cost a lift of the whole catalogue per
    step; LightRec's candidates are one epoch old too)."""
    uu, u_inv = torch.unique(users, return_inverse=True)
    uv = user_vectors(uu)
    scores = torch.einsum("bd,bmd->bm", uv[u_inv], item_table[cand])
    return torch.gather(cand, 1, torch.topk(scores, k, dim=1).indices)


@torch.no_grad()
def lifted_all(vectors, n: int) -> torch.Tensor:
    """``vectors(ids)`` for ids 0..n-1, :data:`DEPLOY_CHUNK` at a time."""
    return torch.cat([vectors(torch.arange(s, min(s + DEPLOY_CHUNK, n)))
                      for s in range(0, n, DEPLOY_CHUNK)])


def _scorer(users: np.ndarray, arrays: dict[str, np.ndarray], sizes: tuple[int, ...],
            method: str):
    return lambda batch: dm.lifted_scores(users[np.asarray(batch, dtype=np.int64)], arrays,
                                          sizes, method)


class MultiDimRecommender(CompressedRecommender):
    """A per-item-size baseline ranked through :func:`peel.device_multidim.lifted_scores`."""

    method: ClassVar[str] = ""
    #: the method's options dataclass and its search module (built per fit)
    options_type: ClassVar[type]
    search_type: ClassVar[type]
    #: the shared optimiser knobs (the controllers' own rates are options of each method)
    search_space: ClassVar[dict[str, tuple]] = {
        "lr": (3e-3, 1e-2, 3e-2),
        "l2": (1e-5, 1e-4, 1e-3),
        "batch_size": (2048, 8192),
        "negatives": (1, 4),
        "sampling": ("uniform", "dns"),
    }

    def __init__(self, config: PretrainConfig | None = None, options: Any = None) -> None:
        super().__init__(config)
        self.sizes: tuple[int, ...] = dm.candidate_sizes(self.config.dim)
        self.options = options or self.options_type()
        self.options.validate()

    def fit(self, data: InteractionData, budget_bytes: int) -> MultiDimRecommender:
        """Search sizes under ``budget_bytes`` with the method's search module, then keep
        the best deployment (:meth:`_finish`)."""
        _, result = self._search(data, budget_bytes)
        self._finish(data, result, budget_bytes, {**asdict(self.options),
                                                  "budget_bytes": budget_bytes})
        return self

    def _search(self, data: InteractionData, budget_bytes: int) -> tuple[Any, SearchResult]:
        """The method's search module, run to its best validated deployment."""
        self.config.validate()
        search = self.search_type(data, self.config, self.options, budget_bytes)
        return search, run_search(data, self.config, search, self.method)

    def device_scores(self, user_vectors: np.ndarray) -> np.ndarray:
        self._ready()
        return dm.lifted_scores(user_vectors, self.arrays, self.sizes, self.method)

    def item_table(self) -> np.ndarray:
        self._ready()
        return dm.lifted_table(self.arrays, self.sizes, self.method)

    def _finish(self, data: InteractionData, result: SearchResult, budget_bytes: int,
                extra: dict[str, Any]) -> None:
        """Keep the best deployment; check and report what the device stores."""
        self.user_emb, self.arrays, self.data = result.user_emb, result.arrays, data
        self.bytes_used = dm.stored_bytes(self.arrays, self.sizes[-1])
        if self.bytes_used > budget_bytes:  # the searches guarantee it; a defect otherwise
            raise AssertionError(f"{self.label}: {self.bytes_used} B stored > budget "
                                 f"{budget_bytes} B")
        levels = self.arrays["codes"]
        dims = np.asarray(self.sizes)[levels]
        self.params = {
            "candidate_sizes": list(self.sizes), "dim": self.sizes[-1],
            **result.info,
            "mean_item_size": float(dims.mean()),
            "bytes": {"codes": int(levels.nbytes),
                      "tables": int(sum(a.nbytes for k, a in self.arrays.items()
                                        if k.startswith("table_"))),
                      "lifting": int(sum(a.nbytes for k, a in self.arrays.items()
                                         if not k.startswith("table_") and k != "codes")),
                      "user_vector": self.sizes[-1] * dm.FLOAT_BYTES},
            **extra,
            "best_epoch": result.best_epoch, "epochs_run": len(result.history),
            "valid_recall@20": result.valid_metrics.get("recall@20"),
            "seconds": result.seconds,
        }
