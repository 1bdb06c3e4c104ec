"""Numpy-only device ranking for the multi-dimensional baselines ESAPN and AutoEmb, and their
byte accounting.

Why a module of its own: like :mod:`peel.device_compressed` (DLRM-CE, LightRec), what a phone
runs for these two methods must import numpy and the standard library only
(``tests/test_multidim.py`` checks it in a fresh interpreter).

Both methods give every item one size ``s`` from a candidate list (2, 4, 8, 16, 64, 128 at
d = 128) and compare every item with one d-dim user vector after *lifting* the item's s-dim
vector to d dims. The device stores:

* ``codes``: one uint8 per item, the index of its size in the candidate list;
* ``table_{s}``: for every size in use, the vectors of the items of that size, (n_s, s)
  float32, rows in increasing item index (row r of ``table_s`` is the r-th item whose code is
  that size, so no item index is stored);
* the lifting maps, which differ by method:

  - **ESAPN** (Liu et al., SIGIR 2020) lifts as its reference code does: a *chain* of affine
    maps between consecutive sizes (``chain_w_{s}``: (s, s_next), ``chain_b_{s}``: (s_next,)),
    so a size-s vector passes every map from s up to d, then one batch norm (folded to
    ``bn_scale``, ``bn_shift``: (d,) each) and tanh. Only the maps from the smallest size in
    use upward are stored.
  - **AutoEmb** (Zhao et al., ICDM 2021) lifts each size with its own affine map to d and its
    own batch norm, folded into the map (``lift_w_{s}``: (s, d), ``lift_b_{s}``: (d,)), then
    tanh. Only the maps of sizes in use are stored.

* one d-dim float32 user vector (the user's lifted vector, computed by the server).

Byte formulas (the sum of the arrays' ``nbytes`` plus the user vector; ``n_s`` items of size
``s``, ``|V|`` items, sizes ``s_0 < ... < s_L = d``):

* ESAPN: ``|V| + 4 * (sum_s n_s * s + sum_{j >= j0} (s_j * s_{j+1} + s_{j+1}) + 2 d + d)``
  with j0 the smallest size in use;
* AutoEmb: ``|V| + 4 * (sum_s n_s * s + sum_{s in use} (s * d + d) + d)``.

Ranking lifts the stored vectors on every call, in chunks of :data:`LIFT_CHUNK` items, so the
working memory beyond what is stored is one chunk of lifted vectors and the |V| scores (a
lifted |V| x d table would cost as much as the full-size model the budget replaces).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from peel.device_compressed import as_users

FLOAT_BYTES = 4
#: Items lifted at once during ranking: bounds the temporary lifted vectors to 4096 x d floats.
LIFT_CHUNK = 4096
#: The candidate sizes of both papers (at d = 128).
CANDIDATE_SIZES = (2, 4, 8, 16, 64, 128)


def candidate_sizes(dim: int) -> tuple[int, ...]:
    """The papers' sizes below ``dim``, then ``dim`` itself (d = 128: the papers' six)."""
    if isinstance(dim, bool) or int(dim) < 1:
        raise ValueError(f"dim {dim!r}: expected a positive integer")
    dim = int(dim)
    return (*tuple(s for s in CANDIDATE_SIZES if s < dim), dim)


# --------------------------------------------------------------------------- byte accounting


def _counts(counts: Sequence[int], sizes: Sequence[int]) -> np.ndarray:
    c = np.asarray(counts, dtype=np.int64)
    if c.shape != (len(sizes),) or (c < 0).any() or c.sum() < 1:
        raise ValueError(f"counts {list(c)}: expected {len(sizes)} non-negative item counts, "
                         "not all zero")
    return c


def chain_floats(sizes: Sequence[int], first: int) -> int:
    """Floats of ESAPN's lifting maps from size index ``first`` up to the last size."""
    return sum(sizes[j] * sizes[j + 1] + sizes[j + 1] for j in range(first, len(sizes) - 1))


def esapn_bytes(counts: Sequence[int], sizes: Sequence[int]) -> int:
    """What a device stores for ESAPN with ``counts[k]`` items of size ``sizes[k]``."""
    c = _counts(counts, sizes)
    dim = sizes[-1]
    first = int(np.flatnonzero(c)[0])
    floats = int((c * np.asarray(sizes)).sum()) + chain_floats(sizes, first) + 2 * dim + dim
    return int(c.sum()) + floats * FLOAT_BYTES


def autoemb_bytes(counts: Sequence[int], sizes: Sequence[int]) -> int:
    """What a device stores for AutoEmb with ``counts[k]`` items of size ``sizes[k]``."""
    c = _counts(counts, sizes)
    dim = sizes[-1]
    used = np.asarray(sizes)[c > 0]
    floats = int((c * np.asarray(sizes)).sum()) + int((used * dim + dim).sum()) + dim
    return int(c.sum()) + floats * FLOAT_BYTES


def stored_bytes(arrays: Mapping[str, np.ndarray], dim: int) -> int:
    """The arrays' bytes plus one d-dim float32 user vector: what ``bytes_used`` must equal."""
    return int(sum(a.nbytes for a in arrays.values())) + dim * FLOAT_BYTES


# --------------------------------------------------------------------------- scoring


def _classes(arrays: Mapping[str, np.ndarray], sizes: Sequence[int]
             ) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(size index, item indices, table) of every size in use; checks the tables' shapes."""
    codes = np.asarray(arrays["codes"])
    if codes.dtype != np.uint8 or codes.ndim != 1:
        raise ValueError("codes: expected a 1-d uint8 array")
    if codes.size and int(codes.max()) >= len(sizes):
        raise ValueError(f"codes name size index {int(codes.max())}; sizes are {list(sizes)}")
    out = []
    for k, s in enumerate(sizes):
        items = np.flatnonzero(codes == k)
        table = arrays.get(f"table_{s}")
        if not items.size:
            if table is not None and len(table):
                raise ValueError(f"table_{s} has rows but no item has size {s}")
            continue
        if table is None or table.shape != (items.size, s):
            raise ValueError(f"table_{s}: expected shape ({items.size}, {s}), got "
                             f"{None if table is None else table.shape}")
        out.append((k, items, table))
    return out


def esapn_lift(x: np.ndarray, level: int, arrays: Mapping[str, np.ndarray],
               sizes: Sequence[int]) -> np.ndarray:
    """Size ``sizes[level]`` vectors through the chain of maps up to d, batch norm, tanh."""
    h = np.asarray(x, dtype=np.float32)
    for j in range(level, len(sizes) - 1):
        s = sizes[j]
        h = h @ arrays[f"chain_w_{s}"] + arrays[f"chain_b_{s}"]
    return np.tanh(h * arrays["bn_scale"] + arrays["bn_shift"])


def autoemb_lift(x: np.ndarray, level: int, arrays: Mapping[str, np.ndarray],
                 sizes: Sequence[int]) -> np.ndarray:
    """Size ``sizes[level]`` vectors through their own folded map to d, then tanh."""
    s = sizes[level]
    return np.tanh(np.asarray(x, dtype=np.float32) @ arrays[f"lift_w_{s}"]
                   + arrays[f"lift_b_{s}"])


LIFTS = {"esapn": esapn_lift, "autoemb": autoemb_lift}


def lifted_scores(users: np.ndarray, arrays: Mapping[str, np.ndarray], sizes: Sequence[int],
                  method: str) -> np.ndarray:
    """(n, |V|) scores: each user vector dotted with every item's lifted vector, the items
    lifted from their stored sizes in chunks (never the whole |V| x d table at once)."""
    if method not in LIFTS:
        raise ValueError(f"method {method!r}: expected one of {', '.join(LIFTS)}")
    lift = LIFTS[method]
    u = as_users(users, sizes[-1])
    n_items = int(np.asarray(arrays["codes"]).shape[0])
    out = np.empty((len(u), n_items), dtype=np.float32)
    for level, items, table in _classes(arrays, sizes):
        for start in range(0, len(items), LIFT_CHUNK):
            rows = slice(start, start + LIFT_CHUNK)
            out[:, items[rows]] = u @ lift(table[rows], level, arrays, sizes).T
    return out


def lifted_table(arrays: Mapping[str, np.ndarray], sizes: Sequence[int],
                 method: str) -> np.ndarray:
    """The |V| x d lifted item table (for checks; the device never builds it)."""
    lift = LIFTS[method]
    n_items = int(np.asarray(arrays["codes"]).shape[0])
    out = np.empty((n_items, sizes[-1]), dtype=np.float32)
    for level, items, table in _classes(arrays, sizes):
        out[items] = lift(table, level, arrays, sizes)
    return out
