"""lightgcn-svd: the full pretrained LightGCN, SVD-rotated and truncated to the budget.

The rotation (:func:`peel.rotation.svd_rotate`) orders dimensions by score energy without
changing any score, so its first D' columns are the best rank-D' model the pretrained one
contains (Eckart-Young). D' is the fixed-size baselines' D' = M // ((|V| + 1) * 4), capped at
the pretrained width. No training at any budget: inside ``peel evaluate`` it reuses the run's
stage 1 (RUN/pretrain/embeddings.safetensors); standalone it pretrains with its config first.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from peel.baselines.base import (
    EmbeddingRecommender,
    fixed_size_bytes,
    fixed_size_dim,
    stage1_tables,
)
from peel.baselines.lightgcn_quantized import device_table, quantized_bytes, quantized_dim
from peel.budget import KIND_F16, KIND_I4, KIND_I8
from peel.data import InteractionData
from peel.pretrain import PretrainConfig, load_embeddings
from peel.quantize import encode
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
            tables, self.pretrain_seconds = stage1_tables(None, data, self.config, self.name)
            self.rotated = svd_rotate(*tables)
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


class QuantizedLightGCNSVD(LightGCNSVD):
    """lightgcn-svd with its item table stored at a lower precision: D' is the largest width
    whose stored table (plus one float32 user vector) fits, as for ``lightgcn-fp16`` /
    ``lightgcn-int8``; the rotation is truncated there and rounded as a package stores a
    block (scores use the decoded table, as a device computes them). The same-storage
    counterpart of PEEL's lower-precision packages: about 2x (float16) or 4x (int8) the
    singular directions of ``lightgcn-svd`` at a budget."""

    kind: ClassVar[int]
    precision: ClassVar[str]
    #: what the device stores after :meth:`fit` (:func:`device_table`)
    stored_table: dict[str, np.ndarray] | None = None

    def fit(self, data: InteractionData, budget_bytes: int) -> QuantizedLightGCNSVD:
        cap = self.rotated.item_emb.shape[1] if self.rotated is not None else self.config.dim
        dim = quantized_dim(budget_bytes, data.n_items, self.kind, cap)
        super().fit(data, fixed_size_bytes(dim, data.n_items))  # the float D'-d truncation
        encoded = encode(self.item_emb, self.kind, f"{self.name}: item table")
        self.item_emb = encoded.decoded.astype(np.float32)
        self.stored_table = device_table(encoded)
        self.bytes_used = quantized_bytes(dim, data.n_items, self.kind)
        self.params["precision"] = self.precision
        return self


class LightGCNSVDFP16(QuantizedLightGCNSVD):
    """lightgcn-svd with a float16 item table: D' = largest with |V| D' 2 + 4 D' <= M."""

    name: ClassVar[str] = "lightgcn-svd-fp16"
    label: ClassVar[str] = "lightgcn-svd-fp16"
    kind: ClassVar[int] = KIND_F16
    precision: ClassVar[str] = "fp16"


class LightGCNSVDInt8(QuantizedLightGCNSVD):
    """lightgcn-svd with an int8 item table, one float16 scale per row:
    D' = largest with |V| (D' + 2) + 4 D' <= M."""

    name: ClassVar[str] = "lightgcn-svd-int8"
    label: ClassVar[str] = "lightgcn-svd-int8"
    kind: ClassVar[int] = KIND_I8
    precision: ClassVar[str] = "int8"


class LightGCNSVDInt4(QuantizedLightGCNSVD):
    """lightgcn-svd with a 4-bit item table, one float16 scale per row:
    D' = largest with |V| (ceil(D'/2) + 2) + 4 D' <= M."""

    name: ClassVar[str] = "lightgcn-svd-int4"
    label: ClassVar[str] = "lightgcn-svd-int4"
    kind: ClassVar[int] = KIND_I4
    precision: ClassVar[str] = "int4"
