"""PMF: BPR matrix factorisation (LightGCN with 0 layers) at the largest size the budget fits."""

from __future__ import annotations

import time
from typing import ClassVar

from peel.baselines.base import (
    EmbeddingRecommender,
    baseline_config,
    fixed_size_bytes,
    fixed_size_dim,
)
from peel.data import InteractionData
from peel.pretrain import pretrain


class PMF(EmbeddingRecommender):
    """Fixed-size matrix factorisation, retrained at D' = M // ((|V| + 1) * 4) per budget."""

    name: ClassVar[str] = "pmf"
    label: ClassVar[str] = "PMF"
    layers: ClassVar[int | None] = 0

    def fit(self, data: InteractionData, budget_bytes: int) -> PMF:
        dim = fixed_size_dim(budget_bytes, data.n_items)
        cfg = baseline_config(self.name, dim, self.config, layers=self.layers)
        t0 = time.perf_counter()
        result = pretrain(data, cfg, progress=False)
        self.user_emb, self.item_emb, self.data = result.user_emb, result.item_emb, data
        self.bytes_used = fixed_size_bytes(dim, data.n_items)
        self.params = {"dim": dim, "layers": cfg.layers, "best_epoch": result.best_epoch,
                       "seconds": time.perf_counter() - t0}
        return self
