"""Methods PEEL is compared with, one module each, behind one interface.

Every class here implements :class:`BudgetedRecommender` (``fit(data, budget_bytes)``,
``scores``, ``rank``, ``bytes_used``, ``params``) and is registered under the name that
``[deploy] baselines`` and ``peel evaluate --baselines pmf,lightgcn-svd`` use. A new baseline
is one new module plus one line in :data:`REGISTRY`; the shared contract test then runs it.
Each class declares ``search_space`` (PretrainConfig fields -> values) for :mod:`peel.tuning`,
which gives every method the same number of validation trials.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from peel.baselines.autoemb import AutoEmb, AutoEmbOptions
from peel.baselines.base import (
    FLOAT_BYTES,
    BudgetedRecommender,
    EmbeddingRecommender,
    baseline_config,
    dims_for_budgets,
    fixed_size_bytes,
    fixed_size_dim,
)
from peel.baselines.bpr_mf import BPRMF
from peel.baselines.dlrm_ce import DLRMCE, QROptions
from peel.baselines.esapn import ESAPN, ESAPNOptions
from peel.baselines.lightgcn import LightGCN, TrainedCache
from peel.baselines.lightgcn_quantized import (
    LightGCNFP16,
    LightGCNInt4,
    LightGCNInt8,
    QuantizedLightGCN,
)
from peel.baselines.lightgcn_svd import (
    LightGCNSVD,
    LightGCNSVDFP16,
    LightGCNSVDInt4,
    LightGCNSVDInt8,
)
from peel.baselines.lightrec import LightRec, LightRecOptions
from peel.baselines.pmf import PMF
from peel.baselines.rule import Rule, RuleConfig
from peel.pretrain import PretrainConfig

#: Registry name -> class; the names ``[deploy] baselines`` accepts.
REGISTRY: dict[str, type[EmbeddingRecommender]] = {
    cls.name: cls for cls in (PMF, BPRMF, LightGCN, LightGCNSVD, LightGCNSVDFP16, LightGCNSVDInt8,
                              LightGCNSVDInt4, LightGCNFP16, LightGCNInt8, LightGCNInt4,
                              DLRMCE, LightRec, ESAPN, AutoEmb, Rule)
}


def check_names(names: Iterable[str], where: str = "baselines") -> None:
    """Refuse unknown method names, listing the known ones."""
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"{where}: unknown baseline(s) {', '.join(map(repr, unknown))}; "
                         f"expected any of {', '.join(REGISTRY)}")


def from_stage1_tables(name: str) -> bool:
    """Built from the run's stage-1 tables alone (the truncations; LightRec's teacher):
    ``from_embeddings(user, item, config)`` makes it, so an executor can send those tables to
    its workers once instead of each worker reading or retraining them."""
    return issubclass(REGISTRY[name], LightGCNSVD | LightRec)


def make_baseline(name: str, config: PretrainConfig, run: str | Path | None = None,
                  trained: TrainedCache | None = None) -> EmbeddingRecommender:
    """A fresh instance of baseline ``name``; ``run`` lets the methods built on the run's
    stage 1 (lightgcn-svd, lightrec's teacher, rule) reuse it; ``trained`` (a dict shared by
    the caller) lets lightgcn and its quantised variants share a training at the same
    dimension."""
    check_names([name])
    if (from_stage1_tables(name) or name == Rule.name) and run is not None:
        return REGISTRY[name].from_run(run, config)  # type: ignore[attr-defined]
    cls = REGISTRY[name]
    if issubclass(cls, QuantizedLightGCN) and run is not None:  # its full size: stage 1
        return cls.from_run(run, config, trained)
    if trained is not None and issubclass(cls, LightGCN):
        return cls(config, trained=trained)
    return cls(config)


__all__ = ["BPRMF", "DLRMCE", "ESAPN", "FLOAT_BYTES", "PMF", "REGISTRY", "AutoEmb",
           "AutoEmbOptions", "BudgetedRecommender", "ESAPNOptions", "EmbeddingRecommender",
           "LightGCN", "LightGCNFP16", "LightGCNInt4", "LightGCNInt8", "LightGCNSVD",
           "LightGCNSVDFP16", "LightGCNSVDInt4", "LightGCNSVDInt8",
           "LightRec", "LightRecOptions", "QROptions", "Rule", "RuleConfig", "baseline_config",
           "check_names", "dims_for_budgets", "fixed_size_bytes", "fixed_size_dim",
           "from_stage1_tables", "make_baseline"]
