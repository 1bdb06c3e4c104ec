"""Rotate a dot-product model so that its dimensions are ordered by score energy.

A model that ranks by ``u . v`` is unchanged by any invertible T applied as
``U' = U T`` and ``V' = V T^-T``: ``U' V'^T = U V^T``. Among those, one basis is special: the
singular directions of the score matrix ``S = U V^T``. With thin QR factorisations
``U = Q_u R_u`` and ``V = Q_v R_v`` (both k x k), ``S = Q_u (R_u R_v^T) Q_v^T``, so an SVD of the
small k x k matrix ``R_u R_v^T = A diag(s) B^T`` gives the exact SVD of S:
``S = (Q_u A) diag(s) (Q_v B)^T``. Splitting ``diag(s)`` evenly,

    U' = Q_u A diag(sqrt(s)),    V' = Q_v B diag(sqrt(s)),

scores are unchanged (to float rounding) and keeping the first r columns of both gives the
best rank-r approximation of S in Frobenius norm (Eckart-Young). That is why a truncated
rotated model is a strong zero-training baseline for any budget (``lightgcn-svd``), and why
PEEL can start its blocks from this basis: block 1 then carries the most score energy, block 2
the next, and so on, so a small package that keeps the leading blocks of an item ranks with
the best small model the pretrained one contains.

Cost: two thin QRs (O((|U| + |V|) k^2)) and one k x k SVD; float64 for accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Rotated:
    """A score-preserving re-basis of (users, items), columns by descending singular value."""

    user_emb: np.ndarray  # (n_users, k) float32
    item_emb: np.ndarray  # (n_items, k) float32
    singular_values: np.ndarray  # (k,) float64, descending

    def truncate(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """The best rank-``dim`` model: the first ``dim`` columns of both tables."""
        if not 1 <= dim <= self.item_emb.shape[1]:
            raise ValueError(f"dim must be in [1, {self.item_emb.shape[1]}], got {dim}")
        return (np.ascontiguousarray(self.user_emb[:, :dim]),
                np.ascontiguousarray(self.item_emb[:, :dim]))

    def energy(self) -> np.ndarray:
        """Cumulative share of ||S||_F^2 kept by the first r columns, r = 1..k."""
        sq = self.singular_values**2
        total = sq.sum()
        return np.cumsum(sq) / total if total > 0 else np.ones_like(sq)


def svd_rotate(user_emb: np.ndarray, item_emb: np.ndarray) -> Rotated:
    """Exact SVD basis of ``user_emb @ item_emb.T`` without forming the |U| x |V| matrix."""
    u = np.asarray(user_emb, dtype=np.float64)
    v = np.asarray(item_emb, dtype=np.float64)
    if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[1]:
        raise ValueError(f"user and item tables must be 2-D with equal widths, got "
                         f"{u.shape} and {v.shape}")
    k = u.shape[1]
    if u.shape[0] < 1 or v.shape[0] < 1:
        raise ValueError(f"need at least one user and one item, got {u.shape[0]} users and "
                         f"{v.shape[0]} items")
    qu, ru = np.linalg.qr(u)  # ru is (min(n_users, k), k)
    qv, rv = np.linalg.qr(v)
    a, s, bt = np.linalg.svd(ru @ rv.T, full_matrices=False)
    root = np.sqrt(s)
    # Fewer users (or items) than k: the score matrix has rank < k, so the trailing columns
    # carry no score at all; they are zero-padded to keep the table k wide.
    user = _pad_columns((qu @ a) * root, k)
    item = _pad_columns((qv @ bt.T) * root, k)
    s = np.concatenate([s, np.zeros(k - len(s))])
    # Singular vectors are defined up to sign; fix it (largest |item entry| positive) so the
    # rotation is a deterministic function of the inputs.
    flip = np.sign(item[np.abs(item).argmax(axis=0), np.arange(k)])
    flip[flip == 0] = 1.0
    return Rotated((user * flip).astype(np.float32), (item * flip).astype(np.float32), s)


def _pad_columns(x: np.ndarray, k: int) -> np.ndarray:
    return x if x.shape[1] == k else np.hstack([x, np.zeros((x.shape[0], k - x.shape[1]))])
