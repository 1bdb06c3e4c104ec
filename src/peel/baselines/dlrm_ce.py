"""DLRM-CE: compositional embeddings by the quotient-remainder trick (Shi et al., KDD 2020).

Item i's vector is ``Q[i // m] (op) R[i % m]`` with Q of ceil(|V| / m) rows and R of m rows,
so every item has a distinct vector (no two items share both a quotient and a remainder) from
ceil(|V| / m) + m rows instead of |V|. ``op`` is the element-wise product (the paper's and the
DLRM reference's default), ``add`` or ``concat`` (each table d / 2 wide).

Under a budget M the vectors keep the run's full width d (128 by default) and m is the
smallest value whose two tables plus one user vector fit (:func:`peel.device_compressed.qr_plan`;
a smaller m means more rows, more parameters); only if no m fits at d is d lowered, and
``params["dim_lowered"]`` says so. The backbone is BPR matrix factorisation over the composed
vectors (:mod:`peel.baselines.compressed` says why not a graph), trained from scratch with the
run's stage-1 recipe. The device stores Q and R and scores every item without composing the
table (:func:`peel.device_compressed.qr_scores`).

Initialisation: Q ~ N(0, init_std). For ``mult``, R ~ N(0, 1) by default
(``remainder_init="normal"``): the items that share a quotient row start in different
directions, and the composed vectors start at init_std's scale. The alternative,
``remainder_init="ones"``, R = 1 + N(0, init_std), starts every item as its quotient row;
it scored lower on ml-1m's validation split (:class:`QROptions`). Two small Gaussians
multiplied would start every score near 0 with vanishing gradients, so R is never drawn at
init_std for ``mult``. For ``add`` and ``concat`` both tables are N(0, init_std).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import torch

from peel import device_compressed as dc
from peel.baselines.compressed import CompressedRecommender, ItemModel, train_bpr
from peel.data import InteractionData
from peel.pretrain import PretrainConfig


@dataclass(frozen=True)
class QROptions:
    """DLRM-CE's own knobs, both chosen on ml-1m's validation split at 21.3%
    (``docs/results/ml-1m/compress/``): ``mult`` (0.1045 Recall@20, against 0.0656 for
    concatenation and 0.0494 for the sum) and R drawn from N(0, 1) (0.1090 against 0.1045 for
    1 + noise; under 0.005 on one seed, so a choice, not a finding)."""

    op: str = "mult"
    #: mult only: R starts at "ones" (1 + noise: every item of a quotient row starts as that
    #: row) or "normal" (N(0, 1): the items that share a quotient row start in different
    #: directions; the reference, facebookresearch/dlrm ``QREmbeddingBag``, draws both
    #: tables at random too, uniformly on [sqrt(1/|V|), 1])
    remainder_init: str = "normal"

    def validate(self) -> None:
        if self.op not in dc.QR_OPS:
            raise ValueError(f"dlrm-ce op {self.op!r}: expected one of {', '.join(dc.QR_OPS)}")
        if self.remainder_init not in ("ones", "normal"):
            raise ValueError(f"dlrm-ce remainder_init {self.remainder_init!r}: expected "
                             "'ones' or 'normal'")


class QRItems(ItemModel):
    """Q and R as trainable tables; items composed on the fly."""

    def __init__(self, n_items: int, m: int, dim: int, op: str, std: float,
                 generator: torch.Generator, remainder_init: str = "ones") -> None:
        super().__init__()
        self.n_items, self.m, self.dim, self.op = n_items, m, dim, op
        dq, dr = dc.qr_table_dims(dim, op)
        q = torch.randn(-(-n_items // m), dq, generator=generator) * std
        r = torch.randn(m, dr, generator=generator)
        if op != "mult" or remainder_init == "ones":
            r = r * std + (1.0 if op == "mult" else 0.0)
        self.q = torch.nn.Parameter(q)
        self.r = torch.nn.Parameter(r)

    def vectors(self, items: torch.Tensor) -> torch.Tensor:
        qi, ri = self.q[items // self.m], self.r[items % self.m]
        if self.op == "mult":
            return qi * ri
        if self.op == "add":
            return qi + ri
        return torch.cat([qi, ri], dim=1)

    def table(self) -> torch.Tensor:
        with torch.no_grad():
            return self.vectors(torch.arange(self.n_items, device=self.q.device))

    def device_arrays(self) -> dict[str, np.ndarray]:
        return {"q": self.q.detach().cpu().numpy().astype(np.float32, copy=True),
                "r": self.r.detach().cpu().numpy().astype(np.float32, copy=True)}


class DLRMCE(CompressedRecommender):
    """Quotient-remainder compositional item embeddings, BPR-MF backbone, d kept at full size."""

    name: ClassVar[str] = "dlrm-ce"
    label: ClassVar[str] = "DLRM-CE"
    search_space: ClassVar[dict[str, tuple]] = {
        "lr": (3e-3, 1e-2, 3e-2),
        "batch_size": (2048, 8192),
        "negatives": (1, 4),
        "sampling": ("uniform", "dns"),
    }

    def __init__(self, config: PretrainConfig | None = None,
                 options: QROptions | None = None) -> None:
        super().__init__(config)
        self.options = options or QROptions()
        self.options.validate()

    def fit(self, data: InteractionData, budget_bytes: int) -> DLRMCE:
        op = self.options.op
        m, dim = dc.qr_plan(budget_bytes, data.n_items, self.config.dim, op)
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed)
        items = QRItems(data.n_items, m, dim, op, cfg.init_std, gen,
                        self.options.remainder_init)
        result = train_bpr(data, cfg, items)
        self.user_emb, self.arrays, self.data = result.user_emb, result.arrays, data
        self.bytes_used = dc.qr_bytes(data.n_items, m, dim, op)
        self.params = {"m": m, "q_rows": int(self.arrays["q"].shape[0]), "r_rows": m,
                       "dim": dim, "dim_lowered": dim < cfg.dim, **asdict(self.options),
                       "best_epoch": result.best_epoch, "epochs_run": len(result.history) - 1,
                       "valid_recall@20": result.valid_metrics.get("recall@20"),
                       "seconds": result.seconds}
        return self

    def device_scores(self, user_vectors: np.ndarray) -> np.ndarray:
        _, data = self._ready()
        return dc.qr_scores(user_vectors, self.arrays["q"], self.arrays["r"], data.n_items,
                            self.options.op)

    def item_table(self) -> np.ndarray:
        _, data = self._ready()
        return dc.qr_compose(self.arrays["q"], self.arrays["r"], data.n_items, self.options.op)
