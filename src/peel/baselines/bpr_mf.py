"""BPR-MF: BPR matrix factorisation (LightGCN with 0 layers) at the largest size the budget fits.

Until issue 13 this row was called "PMF"; it is stage 1's trainer with no propagation, so it
keeps stage 1's pairwise loss and hard (DNS) negatives. The paper's PMF, a squared loss with
Gaussian priors, is :class:`peel.baselines.pmf.PMF`.
"""

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


class BPRMF(EmbeddingRecommender):
    """Fixed-size matrix factorisation trained with BPR, retrained at
    D' = M // ((|V| + 1) * 4) per budget."""

    name: ClassVar[str] = "bpr-mf"
    label: ClassVar[str] = "BPR-MF"
    layers: ClassVar[int | None] = 0
    #: stage 1's optimiser knobs; peel.tuning draws the same number of trials for every method
    search_space: ClassVar[dict[str, tuple]] = {
        "lr": (3e-3, 1e-2, 3e-2),
        "l2": (1e-5, 1e-4, 1e-3),
        "dns_candidates": (8, 16, 32),
    }

    def fit(self, data: InteractionData, budget_bytes: int) -> BPRMF:
        dim = fixed_size_dim(budget_bytes, data.n_items)
        cfg = baseline_config(self.name, dim, self.config, layers=self.layers)
        t0 = time.perf_counter()
        result = pretrain(data, cfg, progress=False)
        self.user_emb, self.item_emb, self.data = result.user_emb, result.item_emb, data
        self.bytes_used = fixed_size_bytes(dim, data.n_items)
        self.params = {"dim": dim, "layers": cfg.layers, "best_epoch": result.best_epoch,
                       "seconds": time.perf_counter() - t0}
        return self
