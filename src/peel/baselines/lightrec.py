"""LightRec: items as sums of codewords from B codebooks (Lian et al., WWW 2020).

Each of B codebooks holds K = 256 codewords of d dims; item i stores one byte per codebook and
its vector is the sum of the B chosen codewords. The assignment is learned end to end, as in
the reference implementation (haoyu0408/LightRec, ``core_model`` with ``rnn_model='res'``):
codebook b encodes the residual the earlier codebooks left of the item's *teacher* vector,
picks the codeword with a softmax over ``-||residual - c||^2 / tau`` (the reference's
``euclidean`` attention), and passes the one-hot argmax forward with the softmax's gradient
backward (straight-through); at inference the codes are the hard argmax. The teacher is the
full-size model: the run's pretrained 128-d LightGCN (``from_run``; standalone, one is
pretrained with the given config). As in the reference, the student's user vectors start from
the teacher's and are trained, and the loss is BPR on the composite vectors plus a distillation
term pulling each composite towards its teacher vector (weight ``distill``). Codebooks start
from residual k-means of the teacher's item table (the reference's commented-out option; its
default, random codebooks, is ``codebook_init="random"``).

Under a budget M the vectors keep the teacher's width d and B is the largest number of
codebooks whose codes (|V| x B bytes), codebooks (B x K x d x 4 bytes) and one user vector fit
(:func:`peel.device_compressed.lightrec_plan`); if not even one fits, d is lowered (the teacher
is then SVD-rotated and truncated to d) and ``params["dim_lowered"]`` says so. K is capped at
|V| for catalogues smaller than 256. The device ranks through per-codebook lookup tables
(:func:`peel.device_compressed.lightrec_scores`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from peel import device_compressed as dc
from peel.baselines.base import stage1_tables
from peel.baselines.compressed import CompressedRecommender, ItemModel, train_bpr
from peel.data import InteractionData
from peel.executor import deterministic_torch
from peel.pretrain import PretrainConfig, load_embeddings
from peel.rotation import svd_rotate

#: Items encoded per chunk when the whole table is (re)computed.
ENCODE_CHUNK = 8192


@dataclass(frozen=True)
class LightRecOptions:
    """LightRec's own knobs; defaults chosen on ml-1m validation (docs/results/ml-1m/compress)."""

    codewords: int = dc.MAX_CODEWORDS  # K
    tau: float = 1.0  # softmax temperature of the relaxed assignment
    distill: float = 1.0  # weight of mean ||composite - teacher||^2 over the batch's items
    codebook_init: str = "kmeans"  # "kmeans" (residual, of the teacher) | "random"
    kmeans_iters: int = 10

    def validate(self) -> None:
        dc.lightrec_codewords(1, self.codewords)
        if not self.tau > 0 or self.distill < 0 or self.kmeans_iters < 0:
            raise ValueError("lightrec: need tau > 0, distill >= 0, kmeans_iters >= 0")
        if self.codebook_init not in ("kmeans", "random"):
            raise ValueError(f"lightrec codebook_init {self.codebook_init!r}: expected "
                             "'kmeans' or 'random'")


def _nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """argmin_k ||x - c_k||^2 per row."""
    return (2 * x @ codebook.T - codebook.pow(2).sum(1)).argmax(dim=1)


def residual_kmeans(teacher: torch.Tensor, n_books: int, k: int, iters: int,
                    generator: torch.Generator) -> torch.Tensor:
    """(B, K, d) codebooks: k-means of the teacher's items, then of what each level leaves."""
    books = []
    res = teacher.clone()
    for _ in range(n_books):
        centers = res[torch.randperm(len(res), generator=generator)[:k]].clone()
        for _ in range(iters):
            assign = _nearest(res, centers)
            sums = torch.zeros_like(centers).index_add_(0, assign, res)
            counts = torch.bincount(assign, minlength=k).to(res.dtype)
            full = counts > 0  # an empty cluster keeps its centre
            centers[full] = sums[full] / counts[full, None]
        res = res - centers[_nearest(res, centers)]
        books.append(centers)
    return torch.stack(books)


class CodebookItems(ItemModel):
    """Codebooks (trainable) and the frozen teacher vectors the codes are computed from."""

    def __init__(self, teacher: np.ndarray, n_books: int, k: int, options: LightRecOptions,
                 std: float, generator: torch.Generator) -> None:
        super().__init__()
        self.n_items, self.dim = teacher.shape
        self.tau, self.distill = options.tau, options.distill
        self.register_buffer("teacher", torch.from_numpy(np.array(teacher, dtype=np.float32)))
        if options.codebook_init == "kmeans":
            books = residual_kmeans(self.teacher, n_books, k, options.kmeans_iters, generator)
        else:
            books = torch.randn(n_books, k, self.dim, generator=generator) * std
        self.codebooks = torch.nn.Parameter(books)
        self._cached: torch.Tensor | None = None

    def encode(self, x: torch.Tensor, hard: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(vectors, codes) of teacher vectors ``x``; ``hard=False`` is the straight-through
        relaxation used in training: the same forward values, and the gradient of
        ``(onehot + soft - stop(soft)) @ C`` (the reference's), written so that no (n, K)
        one-hot is kept for the backward pass."""
        out = torch.zeros_like(x)
        res = x
        codes = []
        for book in self.codebooks:
            logits = (2 * res @ book.T - book.pow(2).sum(1)) / self.tau
            idx = logits.argmax(dim=1)
            codes.append(idx)
            chosen = book[idx]
            if not hard:  # value: the chosen codeword; gradient: also through the softmax
                soft = torch.softmax(logits, dim=1)
                chosen = chosen + (soft - soft.detach()) @ book.detach()
            out = out + chosen
            res = res - chosen
        return out, torch.stack(codes, dim=1)

    def vectors(self, items: torch.Tensor) -> torch.Tensor:
        return self.encode(self.teacher[items], hard=False)[0]

    def aux_loss(self, items: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor | None:
        if self.distill == 0:
            return None
        return self.distill * (vectors - self.teacher[items]).pow(2).sum(1).mean()

    def _hard(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            parts = [self.encode(self.teacher[s: s + ENCODE_CHUNK], hard=True)
                     for s in range(0, self.n_items, ENCODE_CHUNK)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def table(self) -> torch.Tensor:
        return self._hard()[0]

    def start_epoch(self) -> None:
        self._cached = self.table()

    def candidate_table(self) -> torch.Tensor:
        """The table at the start of the epoch: hard negatives are picked with codes at most
        one epoch old (re-encoding every item at every step would cost B x K x d x |V|)."""
        return self.table() if self._cached is None else self._cached

    def device_arrays(self) -> dict[str, np.ndarray]:
        codes = self._hard()[1].cpu().numpy().astype(np.uint8)
        return {"codebooks": self.codebooks.detach().cpu().numpy().astype(np.float32,
                                                                          copy=True),
                "codes": codes}


class LightRec(CompressedRecommender):
    """Composite codebooks distilled from the full-size model; B as large as the budget allows."""

    name: ClassVar[str] = "lightrec"
    label: ClassVar[str] = "LightRec"
    search_space: ClassVar[dict[str, tuple]] = {
        "lr": (1e-3, 3e-3, 1e-2),
        "batch_size": (2048, 8192),
        "negatives": (1, 4),
        "sampling": ("uniform", "dns"),
    }

    def __init__(self, config: PretrainConfig | None = None,
                 options: LightRecOptions | None = None) -> None:
        super().__init__(config)
        self.options = options or LightRecOptions()
        self.options.validate()
        self.teacher: tuple[np.ndarray, np.ndarray] | None = None
        self.teacher_source = "pretrained by fit"
        self.teacher_seconds = 0.0

    @classmethod
    def from_embeddings(cls, user_emb: np.ndarray, item_emb: np.ndarray,
                        config: PretrainConfig | None = None,
                        options: LightRecOptions | None = None) -> LightRec:
        """Use already trained full-size tables as the teacher."""
        model = cls(config, options)
        model.teacher = (np.asarray(user_emb, dtype=np.float32),
                         np.asarray(item_emb, dtype=np.float32))
        model.teacher_source = "given"
        return model

    @classmethod
    def from_run(cls, run: str | Path, config: PretrainConfig | None = None,
                 options: LightRecOptions | None = None) -> LightRec:
        """The run's stage-1 model (RUN/pretrain/embeddings.safetensors) as the teacher."""
        model = cls.from_embeddings(*load_embeddings(Path(run) / "pretrain"), config, options)
        model.teacher_source = str(Path(run) / "pretrain")
        return model

    def _teacher(self, data: InteractionData) -> tuple[np.ndarray, np.ndarray]:
        fresh = self.teacher is None
        self.teacher, seconds = stage1_tables(self.teacher, data, self.config,
                                              "lightrec: the teacher")
        if fresh:
            self.teacher_seconds = seconds
        return self.teacher

    def fit(self, data: InteractionData, budget_bytes: int) -> LightRec:
        users, items = self._teacher(data)
        full_dim = items.shape[1]
        n_books, dim = dc.lightrec_plan(budget_bytes, data.n_items, full_dim,
                                        self.options.codewords)
        if dim < full_dim:  # the best rank-d part of the teacher
            users, items = svd_rotate(users, items).truncate(dim)
        k = dc.lightrec_codewords(data.n_items, self.options.codewords)
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed)
        t0 = time.perf_counter()
        with deterministic_torch():  # k-means accumulates with index_add_
            model = CodebookItems(items, n_books, k, self.options, cfg.init_std, gen)
        init_seconds = time.perf_counter() - t0
        result = train_bpr(data, cfg, model, user_init=users)
        self.user_emb, self.arrays, self.data = result.user_emb, result.arrays, data
        self.bytes_used = dc.lightrec_bytes(data.n_items, n_books, k, dim)
        self.params = {"codebooks": n_books, "codewords": k, "dim": dim,
                       "dim_lowered": dim < full_dim, **asdict(self.options),
                       "teacher": self.teacher_source, "teacher_seconds": self.teacher_seconds,
                       "best_epoch": result.best_epoch, "epochs_run": len(result.history) - 1,
                       "valid_recall@20": result.valid_metrics.get("recall@20"),
                       "init_seconds": init_seconds, "seconds": result.seconds + init_seconds}
        return self

    def device_scores(self, user_vectors: np.ndarray) -> np.ndarray:
        return dc.lightrec_scores(user_vectors, self.arrays["codebooks"], self.arrays["codes"])

    def item_table(self) -> np.ndarray:
        self._ready()
        return dc.lightrec_compose(self.arrays["codebooks"], self.arrays["codes"])
