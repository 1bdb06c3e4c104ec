"""Numpy-only device ranking for the two compression baselines, and their byte accounting.

Why a module of its own: :mod:`peel.device` ranks PEEL packages; DLRM-CE and LightRec store
different arrays, but a phone ranks them under the same rule (numpy and the standard library
only, no torch or scipy; ``tests/test_compressed.py`` checks it in a fresh interpreter).

* **DLRM-CE** (Shi et al., KDD 2020, the quotient-remainder trick) stores a quotient table
  ``Q`` (ceil(|V| / m) rows) and a remainder table ``R`` (m rows); item i is
  ``Q[i // m] (op) R[i % m]``. The device never materialises the |V| x d item table: with
  op = element-wise product the scores of all items are ``Q @ (u * R).T``, a
  (ceil(|V| / m), m) matrix whose row-major entry (q, r) is item q * m + r; ``add`` and
  ``concat`` are the outer sum of ``Q @ u`` and ``R @ u`` (for concat, each on its half of u).
  Same arithmetic as composing the table, a score vector of |V| floats as the only temporary.
* **LightRec** (Lian et al., WWW 2020) stores B codebooks of K codewords and one uint8 code per
  item and codebook; item i is the sum of its B codewords. The device builds the lookup table
  ``u . c`` for every codeword (B x K dot products) and scores an item by summing B table
  entries, the way LightRec serves.

Byte formulas (float32 tables, one d-dim float32 user vector, uint8 codes):

* DLRM-CE: ``(ceil(|V| / m) * d_q + m * d_r) * 4 + d * 4`` with d_q = d_r = d for mult / add
  and d / 2 each for concat;
* LightRec: ``|V| * B + B * K * d * 4 + d * 4``.
"""

from __future__ import annotations

import math

import numpy as np

from peel.budget import KIND_F16, KIND_I4, KIND_I8, BudgetError
from peel.quantize import unpack_nibbles

FLOAT_BYTES = 4
#: Ways to compose the two partial embeddings (the DLRM reference's names).
QR_OPS = ("mult", "add", "concat")
#: LightRec's codebook size; codes are one byte each, so a codebook holds at most 256.
MAX_CODEWORDS = 256


# --------------------------------------------------------------------------- byte accounting


def qr_table_dims(dim: int, op: str) -> tuple[int, int]:
    """Widths of Q and R: both d for mult / add, d / 2 each for concat (d must be even)."""
    if op not in QR_OPS:
        raise ValueError(f"op {op!r}: expected one of {', '.join(QR_OPS)}")
    if op == "concat":
        if dim % 2:
            raise ValueError(f"concat needs an even dimension, got {dim}")
        return dim // 2, dim // 2
    return dim, dim


def qr_bytes(n_items: int, m: int, dim: int, op: str = "mult") -> int:
    """What a device stores for DLRM-CE: Q, R and one user vector."""
    if m < 1 or n_items < 1:
        raise ValueError(f"need m >= 1 and n_items >= 1, got m={m}, n_items={n_items}")
    dq, dr = qr_table_dims(dim, op)
    return (math.ceil(n_items / m) * dq + m * dr) * FLOAT_BYTES + dim * FLOAT_BYTES


def qr_plan(budget_bytes: int, n_items: int, dim: int, op: str = "mult") -> tuple[int, int]:
    """(m, d): the smallest m (most parameters) that fits at ``dim``; if even the most
    compact m does not fit, the largest d below ``dim`` at which some m fits."""
    ms = np.arange(1, n_items + 1, dtype=np.int64)
    step = 2 if op == "concat" else 1
    for d in range(dim - dim % step, 0, -step):
        dq, dr = qr_table_dims(d, op)
        need = (-(-n_items // ms) * dq + ms * dr) * FLOAT_BYTES + d * FLOAT_BYTES
        fits = np.flatnonzero(need <= budget_bytes)
        if fits.size:
            return int(ms[fits[0]]), d
    raise BudgetError(f"budget {budget_bytes} B cannot hold DLRM-CE's two tables for "
                      f"{n_items} items even at d={step} "
                      f"({qr_bytes(n_items, max(1, math.isqrt(n_items)), step, op)} B needed)")


def lightrec_codewords(n_items: int, codewords: int = MAX_CODEWORDS) -> int:
    """K: LightRec's 256, capped at |V| (more codewords than items would be unused)."""
    if not 1 <= codewords <= MAX_CODEWORDS:
        raise ValueError(f"codewords {codewords}: expected 1..{MAX_CODEWORDS} (uint8 codes)")
    return min(codewords, n_items)


def lightrec_bytes(n_items: int, n_codebooks: int, codewords: int, dim: int) -> int:
    """What a device stores for LightRec: uint8 codes, the codebooks, one user vector."""
    return (n_items * n_codebooks + n_codebooks * codewords * dim * FLOAT_BYTES
            + dim * FLOAT_BYTES)


def lightrec_plan(budget_bytes: int, n_items: int, dim: int,
                  codewords: int = MAX_CODEWORDS) -> tuple[int, int]:
    """(B, d): the largest number of codebooks that fits at ``dim``; if not even one does,
    one codebook at the largest d below ``dim`` that fits."""
    k = lightrec_codewords(n_items, codewords)
    n_books = (budget_bytes - dim * FLOAT_BYTES) // (n_items + k * dim * FLOAT_BYTES)
    if n_books >= 1:
        return int(n_books), dim
    for d in range(dim - 1, 0, -1):
        if lightrec_bytes(n_items, 1, k, d) <= budget_bytes:
            return 1, d
    raise BudgetError(f"budget {budget_bytes} B cannot hold one LightRec codebook of {k} "
                      f"codewords for {n_items} items even at d=1 "
                      f"({lightrec_bytes(n_items, 1, k, 1)} B needed)")


# --------------------------------------------------------------------------- scoring


#: Items widened at once by :func:`quantized_scores` (a cache-sized float32 tile).
QUANT_CHUNK = 4096


def as_users(users: np.ndarray, dim: int) -> np.ndarray:
    """User vectors as a float32 (n, dim) array (one vector is one row); shape checked."""
    u = np.asarray(users, dtype=np.float32)
    if u.ndim == 1:
        u = u[None, :]
    if u.ndim != 2 or u.shape[1] != dim:
        raise ValueError(f"user vectors: expected shape (n, {dim}), got {np.shape(users)}")
    return u


def qr_scores(users: np.ndarray, q: np.ndarray, r: np.ndarray, n_items: int,
              op: str = "mult") -> np.ndarray:
    """(n, |V|) scores of composed items ``Q[i // m] (op) R[i % m]`` without composing them."""
    m = r.shape[0]
    if q.shape[0] != -(-n_items // m):
        raise ValueError(f"Q has {q.shape[0]} rows; {n_items} items with m={m} need "
                         f"{-(-n_items // m)}")
    dim = q.shape[1] + r.shape[1] if op == "concat" else q.shape[1]
    u = as_users(users, dim)
    if op == "mult":
        s = np.matmul(u[:, None, :] * r[None, :, :], q.T)  # (n, m, nq)
        s = s.transpose(0, 2, 1)
    elif op == "add":
        s = (u @ q.T)[:, :, None] + (u @ r.T)[:, None, :]
    elif op == "concat":
        dq = q.shape[1]
        s = (u[:, :dq] @ q.T)[:, :, None] + (u[:, dq:] @ r.T)[:, None, :]
    else:
        raise ValueError(f"op {op!r}: expected one of {', '.join(QR_OPS)}")
    return np.ascontiguousarray(s.reshape(len(u), -1)[:, :n_items], dtype=np.float32)


def qr_compose(q: np.ndarray, r: np.ndarray, n_items: int, op: str = "mult") -> np.ndarray:
    """The |V| x d item table DLRM-CE represents (for checks; the device never builds it)."""
    items = np.arange(n_items)
    m = r.shape[0]
    qi, ri = q[items // m], r[items % m]
    if op == "mult":
        return qi * ri
    if op == "add":
        return qi + ri
    if op == "concat":
        return np.concatenate([qi, ri], axis=1)
    raise ValueError(f"op {op!r}: expected one of {', '.join(QR_OPS)}")


def lightrec_scores(users: np.ndarray, codebooks: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """(n, |V|) scores through per-codebook lookup tables: sum_b (u . C_b)[codes[:, b]]."""
    n_books, k, dim = codebooks.shape
    if codes.ndim != 2 or codes.shape[1] != n_books:
        raise ValueError(f"codes: expected (n_items, {n_books}), got {codes.shape}")
    u = as_users(users, dim)
    lut = u @ codebooks.reshape(n_books * k, dim).T  # (n, B * K): every u . codeword
    out = np.zeros((len(u), codes.shape[0]), dtype=np.float32)
    for b in range(n_books):
        out += lut[:, b * k + codes[:, b].astype(np.intp)]
    return out


def lightrec_compose(codebooks: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The |V| x d item table LightRec represents (for checks; the device never builds it)."""
    out = np.zeros((codes.shape[0], codebooks.shape[2]), dtype=np.float32)
    for b in range(codebooks.shape[0]):
        out += codebooks[b][codes[:, b].astype(np.intp)]
    return out


def quantized_scores(users: np.ndarray, kind: int, values: np.ndarray,
                     scale: np.ndarray | None, dim: int) -> np.ndarray:
    """(n, |V|) scores of a fixed-size item table stored row-wise quantised, as
    ``lightgcn-fp16`` / ``-int8`` / ``-int4`` (and their ``lightgcn-svd`` twins) store it:
    ``values`` is the (dim, |V|) float16 table or the int8 codes ((ceil(dim/2), |V|) packed
    nibbles at 4 bits) and ``scale`` the float16 scale of each item row (None for float16).
    Why chunks: the codes are widened :data:`QUANT_CHUNK` items at a time and each row's
    scale multiplies its score, not its values, so the float32 table is never built (it
    would cost 2-8x the bytes the budget allows)."""
    if kind not in (KIND_F16, KIND_I8, KIND_I4):
        raise ValueError(f"kind {kind!r}: expected float16, int8 or 4-bit rows")
    u = as_users(users, dim)
    n_items = values.shape[1]
    if (scale is None) != (kind == KIND_F16) or (scale is not None and len(scale) != n_items):
        raise ValueError("scale: one float16 per item row for int8 / 4-bit tables, "
                         "none for float16")
    out = np.empty((len(u), n_items), dtype=np.float32)
    for a in range(0, n_items, QUANT_CHUNK):
        chunk = values[:, a: a + QUANT_CHUNK]
        if kind == KIND_I4:
            chunk = unpack_nibbles(chunk, dim)
        part = u @ chunk.astype(np.float32)
        if scale is not None:
            part *= scale[a: a + QUANT_CHUNK].astype(np.float32)
        out[:, a: a + QUANT_CHUNK] = part
    return out


# --------------------------------------------------------------------------- ranking


def top_k(scores: np.ndarray, k: int, exclude_indptr: np.ndarray | None = None,
          exclude_indices: np.ndarray | None = None) -> np.ndarray:
    """Best ``k`` items per row, best first (equal scores: lower index first), the row's
    excluded items (CSR ``exclude_indptr`` / ``exclude_indices``) left out; rows with fewer
    than ``k`` candidates are padded with -1, as :mod:`peel.device` does."""
    if isinstance(k, bool) or int(k) < 1:
        raise ValueError(f"k {k!r}: expected a positive integer")
    s = np.array(scores, dtype=np.float32, ndmin=2)  # a copy: exclusions are written into it
    n, n_items = s.shape
    if exclude_indptr is not None and exclude_indices is not None:
        ptr = np.asarray(exclude_indptr, dtype=np.int64)
        rows = np.repeat(np.arange(n), np.diff(ptr))
        s[rows, np.asarray(exclude_indices, dtype=np.int64)] = -np.inf
    k = min(int(k), n_items)
    part = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < n_items else np.tile(
        np.arange(n_items), (n, 1))
    vals = np.take_along_axis(s, part, axis=1)
    kth = vals.min(axis=1, keepdims=True)
    cut = np.flatnonzero((s == kth).sum(axis=1) > (vals == kth).sum(axis=1))
    for row in cut:  # ties across the k-th place (rare with float scores): lowest index wins
        part[row] = np.argsort(-s[row], kind="stable")[:k]
        vals[row] = s[row, part[row]]
    order = np.lexsort((part, -vals), axis=1)
    top = np.take_along_axis(part, order, axis=1)
    top[np.take_along_axis(vals, order, axis=1) == -np.inf] = -1
    return top
