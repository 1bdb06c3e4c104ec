"""LightGCN (the paper's fixed-size baseline) retrained at the largest size the budget fits."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np

from peel.baselines.base import baseline_config, fixed_size_bytes, fixed_size_dim
from peel.baselines.bpr_mf import BPRMF
from peel.data import InteractionData
from peel.pretrain import PretrainConfig, pretrain

#: A shared cache of trained float tables: key -> (user_emb, item_emb, best_epoch, seconds).
TrainedCache = dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray, int, float]]


class LightGCN(BPRMF):
    """Stage 1's LightGCN without the diversity term, one block, D' = M // ((|V| + 1) * 4).

    ``trained``, a dict the caller shares between instances, holds each training by its data
    and exact config: LightGCN at 27-d (fp32 at one budget) and LightGCN-fp16 at 27-d (at
    half that budget) are the same model, so a comparison trains it once. Training is seeded
    by the config, so a cached model equals a fresh one.
    """

    name: ClassVar[str] = "lightgcn"
    label: ClassVar[str] = "LightGCN"
    layers: ClassVar[int | None] = None  # the configured number of layers
    search_space: ClassVar[dict[str, tuple]] = {
        **BPRMF.search_space,
        "layers": (1, 2, 3),
    }

    def __init__(self, config: PretrainConfig | None = None,
                 trained: TrainedCache | None = None) -> None:
        super().__init__(config)
        self.trained = trained

    def _train(self, data: InteractionData, cfg: PretrainConfig
               ) -> tuple[np.ndarray, np.ndarray, int, float]:
        """Train LightGCN with ``cfg`` (or reuse the shared cache's identical training)."""
        key = (data.name, data.n_users, data.n_items, data.train.nnz, repr(cfg))
        if self.trained is not None and key in self.trained:
            return self.trained[key]
        t0 = time.perf_counter()
        result = pretrain(data, cfg, progress=False)
        value = (result.user_emb, result.item_emb, result.best_epoch, time.perf_counter() - t0)
        if self.trained is not None:
            self.trained[key] = value
        return value

    def fit(self, data: InteractionData, budget_bytes: int) -> LightGCN:
        dim = fixed_size_dim(budget_bytes, data.n_items)
        cfg = baseline_config(self.name, dim, self.config, layers=self.layers)
        self.user_emb, self.item_emb, best_epoch, seconds = self._train(data, cfg)
        self.data = data
        self.bytes_used = fixed_size_bytes(dim, data.n_items)
        self.params = {"dim": dim, "layers": cfg.layers, "best_epoch": best_epoch,
                       "seconds": seconds}
        return self
