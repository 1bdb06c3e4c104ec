"""LightGCN stored at float16, int8 or 4 bits: the fixed-size baseline at the precisions
packages use.

Mixed-precision packages buy PEEL more blocks per byte; for a fair comparison the fixed-size
LightGCN gets the same storage. For a budget of M bytes a device holds the quantised item
table, its per-row scales (int8) and one float32 user vector:

* ``lightgcn-fp16``: |V| * D' * 2 + D' * 4 <= M;
* ``lightgcn-int8``: |V| * (D' + 2) + D' * 4 <= M (one float16 scale per item row, the
  ``i8`` rows of :mod:`peel.quantize`);
* ``lightgcn-int4``: |V| * (ceil(D'/2) + 2) + D' * 4 <= M (4-bit codes, one float16 scale per
  item row, the ``i4`` rows), the counterpart of packages whose blocks are 4-bit.

D' is the largest such dimension, capped at the configured full dimension (``dim``, 128 by
default). LightGCN is trained at D' with the recipe of ``lightgcn`` and its item table is then
quantised row by row exactly as a package stores a block; scores use the decoded table, which
is what a device computes with.

At D' = the full dimension, when the model is made from a run (:meth:`from_run`), the
LightGCN is the run's stage 1, the pretrained full-size LightGCN, as LightGCN's own 100% row
is (``benchmarks/budget_compare.py``, ``FULL_SIZE_IS_PRETRAINED``): a second full-size
training would cost an hour on gowalla and answer a question the pretrained row already
answers. ``params["same_model_as"]`` then says ``"pretrained"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from peel.baselines.base import FLOAT_BYTES, baseline_config, stage1_tables
from peel.baselines.lightgcn import LightGCN, TrainedCache
from peel.budget import KIND_F16, KIND_I4, KIND_I8, row_bytes
from peel.data import InteractionData
from peel.pretrain import PretrainConfig, load_embeddings
from peel.quantize import Encoded, encode


def quantized_bytes(dim: int, n_items: int, kind: int) -> int:
    """What a device stores: the item table at ``kind`` (with its scales) + a float32 user."""
    return n_items * row_bytes(kind, dim) + dim * FLOAT_BYTES


def quantized_dim(budget_bytes: int, n_items: int, kind: int, cap: int) -> int:
    """The largest D' <= ``cap`` whose :func:`quantized_bytes` fits ``budget_bytes``."""
    if quantized_bytes(1, n_items, kind) > budget_bytes:
        raise ValueError(f"budget {budget_bytes} B cannot hold even a 1-d item table"
                         f" ({quantized_bytes(1, n_items, kind)} B needed)")
    lo, hi = 1, max(int(cap), 1)
    while lo < hi:  # the cost grows with D', so the largest fitting D' is a binary search
        mid = (lo + hi + 1) // 2
        if quantized_bytes(mid, n_items, kind) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def device_table(encoded: Encoded) -> dict[str, np.ndarray]:
    """What a device stores of a quantised table (:func:`peel.device_compressed.
    quantized_scores` ranks it): the (D', |V|) values or codes, and the per-row scales."""
    if encoded.kind == KIND_F16:
        return {"values": encoded.parts[0]}
    scale, values = encoded.parts
    return {"values": values, "scale": scale}


class QuantizedLightGCN(LightGCN):
    """LightGCN trained at the largest D' whose quantised table fits, then quantised."""

    kind: ClassVar[int] = KIND_I8
    precision: ClassVar[str] = "int8"
    #: Values a shared tuning driver may try, by :class:`peel.pretrain.PretrainConfig` field.
    search_space: ClassVar[dict[str, tuple]] = {
        "lr": (1e-3, 3e-3, 1e-2),
        "l2": (1e-5, 1e-4, 1e-3),
        "layers": (1, 2, 3),
    }

    #: the run whose stage 1 is the full-size model (:meth:`from_run`), or None
    run: Path | None = None
    #: what the device stores after :meth:`fit` (:func:`device_table`)
    stored_table: dict[str, np.ndarray] | None = None

    @classmethod
    def from_run(cls, run: str | Path, config: PretrainConfig | None = None,
                 trained: TrainedCache | None = None) -> QuantizedLightGCN:
        """A model whose full-size case is ``run``'s stage 1 instead of a new training."""
        model = cls(config, trained=trained)
        model.run = Path(run)
        return model

    def fit(self, data: InteractionData, budget_bytes: int) -> QuantizedLightGCN:
        dim = quantized_dim(budget_bytes, data.n_items, self.kind, self.config.dim)
        cfg = baseline_config(self.name, dim, self.config, layers=self.layers)
        same: dict[str, str] = {}
        if dim == self.config.dim and self.run is not None:
            (user_emb, item_emb), _ = stage1_tables(load_embeddings(self.run / "pretrain"),
                                                    data, self.config, self.name)
            best_epoch, seconds, same = 0, 0.0, {"same_model_as": "pretrained"}
        else:
            user_emb, item_emb, best_epoch, seconds = self._train(data, cfg)
        encoded = encode(item_emb, self.kind, f"{self.name}: item table")
        stored = encoded.decoded
        error = float(np.linalg.norm(stored - item_emb) / max(np.linalg.norm(item_emb), 1e-30))
        self.user_emb, self.item_emb, self.data = user_emb, stored.astype(np.float32), data
        self.stored_table = device_table(encoded)
        self.bytes_used = quantized_bytes(dim, data.n_items, self.kind)
        self.params = {"dim": dim, "full_dim": self.config.dim, "precision": self.precision,
                       "layers": cfg.layers, "best_epoch": best_epoch,
                       "train_seconds": seconds, "table_error": error, **same}
        return self


class LightGCNFP16(QuantizedLightGCN):
    """LightGCN with a float16 item table: D' = largest with |V| D' 2 + 4 D' <= M."""

    name: ClassVar[str] = "lightgcn-fp16"
    label: ClassVar[str] = "LightGCN-fp16"
    kind: ClassVar[int] = KIND_F16
    precision: ClassVar[str] = "fp16"


class LightGCNInt8(QuantizedLightGCN):
    """LightGCN with an int8 item table, one float16 scale per item row:
    D' = largest with |V| (D' + 2) + 4 D' <= M."""

    name: ClassVar[str] = "lightgcn-int8"
    label: ClassVar[str] = "LightGCN-int8"
    kind: ClassVar[int] = KIND_I8
    precision: ClassVar[str] = "int8"


class LightGCNInt4(QuantizedLightGCN):
    """LightGCN with a 4-bit item table, one float16 scale per item row:
    D' = largest with |V| (ceil(D'/2) + 2) + 4 D' <= M."""

    name: ClassVar[str] = "lightgcn-int4"
    label: ClassVar[str] = "LightGCN-int4"
    kind: ClassVar[int] = KIND_I4
    precision: ClassVar[str] = "int4"
