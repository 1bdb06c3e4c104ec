"""PEEL: Personalized Elastic Embedding Learning for on-device recommendation.

The public API (see docs/api.md)::

    import peel

    run = peel.PEEL(peel.demo_config()).fit("demo", out="runs/demo")
    rows = run.evaluate(["0.107"])                 # Recall/NDCG on the device runtime
    pkg = run.package("0.107", user=7)             # what a phone gets
    top = pkg.rank(k=10)

Names are imported lazily so that ``import peel`` stays cheap (the device runtime needs only
numpy).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    "PEEL": "peel.api",
    "Run": "peel.api",
    "PEELRecommender": "peel.api",
    "demo_config": "peel.api",
    "load_config": "peel.api",
    "RunConfig": "peel.pipeline",
    "EvalRow": "peel.pipeline",
    "InteractionData": "peel.data",
    "DataConfig": "peel.data",
    "load_dataset": "peel.data",
    "from_interactions": "peel.data",
    "from_splits": "peel.data",
    "Package": "peel.device",
    "open_package": "peel.device",
    "BudgetedRecommender": "peel.baselines",
    "BASELINES": "peel.baselines",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'peel' has no attribute {name!r}")
    attr = "REGISTRY" if name == "BASELINES" else name
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
