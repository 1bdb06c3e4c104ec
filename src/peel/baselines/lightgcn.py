"""LightGCN (the paper's fixed-size baseline) retrained at the largest size the budget fits."""

from __future__ import annotations

from typing import ClassVar

from peel.baselines.bpr_mf import BPRMF


class LightGCN(BPRMF):
    """Stage 1's LightGCN without the diversity term, one block, D' = M // ((|V| + 1) * 4)."""

    name: ClassVar[str] = "lightgcn"
    label: ClassVar[str] = "LightGCN"
    layers: ClassVar[int | None] = None  # the configured number of layers
    search_space: ClassVar[dict[str, tuple]] = {
        **BPRMF.search_space,
        "layers": (1, 2, 3),
    }
