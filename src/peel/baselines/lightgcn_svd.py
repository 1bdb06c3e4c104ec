"""lightgcn-svd: the full pretrained LightGCN, SVD-rotated and truncated to the budget.

The rotation (:func:`peel.rotation.svd_rotate`) orders dimensions by score energy without
changing any score, so its first D' columns are the best rank-D' model the pretrained one
contains (Eckart-Young). D' is the fixed-size baselines' D' = M // ((|V| + 1) * 4), capped at
the pretrained width. No training at any budget: inside ``peel evaluate`` it reuses the run's
stage 1 (RUN/pretrain/embeddings.safetensors); standalone it pretrains with its config first.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar

import numpy as np

from peel.baselines.base import EmbeddingRecommender, fixed_size_bytes, fixed_size_dim
from peel.data import InteractionData
from peel.pretrain import PretrainConfig, load_embeddings, pretrain
from peel.rotation import Rotated, svd_rotate


class LightGCNSVD(EmbeddingRecommender):
    """Truncated SVD basis of a pretrained LightGCN: scores u'[:D'] . v'[:D']."""

    name: ClassVar[str] = "lightgcn-svd"
    label: ClassVar[str] = "lightgcn-svd"
    #: nothing to tune: no training at any budget, the truncation is fixed by the budget
    search_space: ClassVar[dict[str, tuple]] = {}

    def __init__(self, config: PretrainConfig | None = None) -> None:
        super().__init__(config)
        self.rotated: Rotated | None = None
        self.pretrain_seconds = 0.0

    @classmethod
    def from_embeddings(cls, user_emb: np.ndarray, item_emb: np.ndarray,
                        config: PretrainConfig | None = None) -> LightGCNSVD:
        """Start from already pretrained tables (e.g. a run's stage 1)."""
        model = cls(config)
        model.rotated = svd_rotate(user_emb, item_emb)
        return model

    @classmethod
    def from_run(cls, run: str | Path, config: PretrainConfig | None = None) -> LightGCNSVD:
        """Start from a run's stage-1 embeddings (RUN/pretrain/embeddings.safetensors)."""
        return cls.from_embeddings(*load_embeddings(Path(run) / "pretrain"), config)

    def fit(self, data: InteractionData, budget_bytes: int) -> LightGCNSVD:
        if self.rotated is None:
            t0 = time.perf_counter()
            result = pretrain(data, self.config, progress=False)
            self.pretrain_seconds = time.perf_counter() - t0
            self.rotated = svd_rotate(result.user_emb, result.item_emb)
        rotated = self.rotated
        if rotated.item_emb.shape[0] != data.n_items:
            raise ValueError(f"lightgcn-svd: the pretrained tables have "
                             f"{rotated.item_emb.shape[0]} items but the data has "
                             f"{data.n_items}")
        dim = min(fixed_size_dim(budget_bytes, data.n_items), rotated.item_emb.shape[1])
        self.user_emb, self.item_emb = rotated.truncate(dim)
        self.data = data
        self.bytes_used = fixed_size_bytes(dim, data.n_items)
        self.params = {"dim": dim, "full_dim": int(rotated.item_emb.shape[1]),
                       "energy": float(rotated.energy()[dim - 1]),
                       "pretrain_seconds": self.pretrain_seconds}
        return self
