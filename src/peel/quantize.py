"""Row-wise float16 / int8 storage of embedding blocks: encoding (server) and reference decoding.

A block of an item group is ``rows`` items by ``d`` values. It is stored dimension-major like a
float32 block, as one of the kinds of :data:`peel.budget.BLOCK_KINDS`:

* ``f16``: IEEE float16 values, (d, rows);
* ``i8``: one float16 scale per row, then int8 codes (d, rows); x ~ scale * code, with
  scale = max|x| / 127 rounded up to a float16, so no code is clipped;
* ``i8o``: a float16 scale and a float16 offset per row, then the codes; x ~ offset +
  scale * code, the offset being the middle of the row's range (better for rows that are not
  centred on zero, at 2 more bytes per row).
* ``i4``: one float16 scale per row (max|x| / 7), then 4-bit codes in [-7, 7], two a byte:
  byte row j (of ceil(d/2)) holds dim j in its low nibble and dim j + ceil(d/2) in its high
  one, so the device widens each half with one shift pair into consecutive rows.
* ``i8s`` / ``i4s``: int8 / 4-bit codes (packed as ``i4``) after d float32 column scales; the
  row scale is not stored with the block but once per item in the package (:func:`row_scales`),
  shared by all of the item's blocks: x[i, j] ~ row_scale[i] * col_scale[j] * code. A per-row
  scale per block costs 2 bytes per 8 values at d = 8 (25% of an int8 block, 33% of a 4-bit
  one); a truncated fixed-size table pays it once per row. Sharing it makes PEEL pay the same.
* ``r4s``: a 4-bit refinement of an ``i4s`` block: the ``i4s`` encoding of what the block's
  ``i4s`` codes leave over (x - decoded), with the same row scale and its own column scales.
  The device adds it as one more term of the same block, so block plus refinement hold about
  8 bits a value (codes of 15 levels within half a step of 15), and a package that drops the
  refinement still holds the block at 4 bits: precision too is a prefix.

One scale per item row is FBGEMM's fused row-wise layout (Guan et al. 2019 measured it neutral
for recommendation quality at 8 bits). Codes are rounded to nearest and lie in [-127, 127].
Everything here is numpy only: :mod:`peel.device` uses :func:`decode` to hand out float views.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from peel.budget import (
    BLOCK_ALIGN,
    BLOCK_KINDS,
    KIND_F16,
    KIND_F32,
    KIND_I4,
    KIND_I4S,
    KIND_I8,
    KIND_I8O,
    KIND_I8S,
    KIND_R4S,
    NIBBLE_KINDS,
    SHARED_KINDS,
)

#: The largest finite float16; values (or int8 scales and offsets) beyond it cannot be stored.
F16_MAX = float(np.finfo(np.float16).max)
CODE_MAX = 127
#: The largest 4-bit code (symmetric, so -8 is never written).
CODE_MAX_4 = 7


class PrecisionError(ValueError):
    """A block whose values cannot be stored at the asked precision (beyond float16's range)."""


@dataclass(frozen=True)
class Encoded:
    """One block at one kind: the stored arrays, in file order, and the values they decode to."""

    kind: int
    parts: tuple[np.ndarray, ...]  # little-endian arrays, written one after the other
    decoded: np.ndarray  # (rows, d) float64: what the device computes with

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def payload(self) -> list[np.ndarray]:
        """The parts as bytes, padded to :data:`peel.budget.BLOCK_ALIGN`."""
        raw = [np.ascontiguousarray(p).reshape(-1).view(np.uint8) for p in self.parts]
        pad = -self.nbytes % BLOCK_ALIGN
        return raw + ([np.zeros(pad, dtype=np.uint8)] if pad else [])


def _round_up(values: np.ndarray, dtype: str = "<f2") -> np.ndarray:
    """``values`` (non-negative) as ``dtype``, one step up wherever rounding went below them,
    so a scale never makes a code exceed its range."""
    h = values.astype(dtype)
    low = h.astype(np.float64) < values
    if low.any():
        h[low] = np.nextafter(h[low], np.array(np.inf, dtype=dtype))
    return h


def _check_range(x: np.ndarray, limit: float, what: str, where: str) -> None:
    peak = float(np.abs(x).max(initial=0.0))
    if peak > limit:
        raise PrecisionError(f"{where}: {what} {peak:.4g} is beyond float16's range "
                             f"({F16_MAX:g}); store this block as float32 (--precision fp32)")


def row_scales(x: np.ndarray, where: str = "item group") -> np.ndarray:
    """One float16 scale per item of an item group's (rows, N, d) blocks, for the shared kinds.

    Each value is divided by its (block, dim) column's root mean square over the group's items,
    and an item's scale is the largest such ratio over all its N * d values (rounded up to a
    float16). Normalising by the column first keeps one large column (or block) from setting
    every item's scale; measured on gowalla this halves the error of sharing the item's plain
    max|x| (docs/paper-notes.md, "Shared row scales"). The scale looks at every block, kept or
    not, so it does not depend on the budget (a shrunk package keeps it exactly).
    """
    rows = np.asarray(x, dtype=np.float64)
    if rows.ndim != 3:
        raise ValueError(f"{where}: expected (rows, blocks, d) values, got shape {rows.shape}")
    col = np.sqrt(np.mean(rows * rows, axis=0)) if rows.shape[0] else np.ones(rows.shape[1:])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(col > 0, np.abs(rows) / np.where(col > 0, col, 1), 0)
    peak = ratio.reshape(rows.shape[0], -1).max(axis=1, initial=0.0)
    _check_range(peak, F16_MAX, "a shared row scale of", where)
    return _round_up(peak)


def _encode_shared(rows: np.ndarray, kind: int, row_scale: np.ndarray | None,
                   where: str) -> Encoded:
    """``i8s`` / ``i4s``: codes = rint(x / (row_scale * col)) with col = max |x / row_scale|
    over the block's rows / the largest code, a float32 per dimension (rounded up)."""
    if row_scale is None or np.shape(row_scale) != (rows.shape[0],):
        raise ValueError(f"{where}: a shared-scale block needs one row scale per row")
    r = np.asarray(row_scale).astype(np.float64)[:, None]
    top = CODE_MAX if kind == KIND_I8S else CODE_MAX_4
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(r > 0, rows / np.where(r > 0, r, 1), 0.0)
    col = _round_up(np.abs(y).max(axis=0, initial=0.0) / top, "<f4")
    c = col.astype(np.float64)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(c > 0, np.rint(y / np.where(c > 0, c, 1)), 0)
    codes = np.clip(codes, -top, top).astype(np.int8)
    decoded = r * c * codes
    stored = np.ascontiguousarray(codes.T) if kind == KIND_I8S else pack_nibbles(codes.T)
    return Encoded(kind, (col, stored), decoded)


def _encode_refinement(rows: np.ndarray, row_scale: np.ndarray | None, where: str) -> Encoded:
    """``r4s``: the ``i4s`` codes of the block's leftover after its own ``i4s`` codes. Its
    ``decoded`` is that term alone, which the device adds to the block's."""
    base = _encode_shared(rows, KIND_I4S, row_scale, where)
    rest = _encode_shared(rows - base.decoded, KIND_I4S, row_scale, where)
    return Encoded(KIND_R4S, rest.parts, rest.decoded)


def encode(x: np.ndarray, kind: int, where: str = "block",
           row_scale: np.ndarray | None = None) -> Encoded:
    """Encode one (rows, d) block at ``kind`` (a :data:`BLOCK_KINDS` code); the shared kinds
    need the rows' ``row_scale`` (:func:`row_scales`). A refinement (``r4s``) is encoded from
    the block's values, not from what is left over: it encodes the ``i4s`` codes first."""
    rows = np.asarray(x, dtype=np.float64)
    if rows.ndim != 2:
        raise ValueError(f"{where}: expected a (rows, d) block, got shape {rows.shape}")
    if kind == KIND_R4S:
        return _encode_refinement(rows, row_scale, where)
    if kind in SHARED_KINDS:
        return _encode_shared(rows, kind, row_scale, where)
    if kind == KIND_F32:
        values = np.ascontiguousarray(rows.T, dtype="<f4")
        return Encoded(kind, (values,), values.T.astype(np.float64))
    if kind == KIND_F16:
        _check_range(rows, F16_MAX, "a value of", where)
        values = np.ascontiguousarray(rows.T, dtype="<f2")
        return Encoded(kind, (values,), values.T.astype(np.float64))
    if kind in (KIND_I8, KIND_I4):
        offset = np.zeros(rows.shape[0])
        radius = np.abs(rows).max(axis=1, initial=0.0)
    elif kind == KIND_I8O:
        lo, hi = rows.min(axis=1, initial=np.inf), rows.max(axis=1, initial=-np.inf)
        _check_range(np.stack([lo, hi]), F16_MAX, "an offset of", where)
        offset = ((lo + hi) / 2).astype("<f2").astype(np.float64)
        radius = np.maximum(hi - offset, offset - lo)
    else:
        raise ValueError(f"{where}: unknown block kind {kind!r}; expected a code in "
                         f"[0, {len(BLOCK_KINDS)})")
    top = CODE_MAX_4 if kind == KIND_I4 else CODE_MAX
    _check_range(radius / top, F16_MAX, "a quantisation scale of", where)
    scale = _round_up(radius / top)
    s = scale.astype(np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(s > 0, np.rint((rows - offset[:, None]) / np.where(s > 0, s, 1)), 0)
    codes = np.clip(codes, -top, top).astype(np.int8)
    decoded = offset[:, None] + s * codes
    if kind == KIND_I4:
        return Encoded(kind, (scale, pack_nibbles(codes.T)), decoded)
    stored = np.ascontiguousarray(codes.T)
    parts = (scale, stored) if kind == KIND_I8 else (scale, offset.astype("<f2"), stored)
    return Encoded(kind, parts, decoded)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """(d, rows) codes in [-8, 7] -> (ceil(d/2), rows) int8: row j = dim j | dim j + h << 4."""
    d = codes.shape[0]
    h = (d + 1) // 2
    low = codes[:h].astype(np.int8)
    high = np.zeros_like(low)
    high[: d - h] = codes[h:]
    packed = (low & 0x0F) | (high << 4)  # int8 arithmetic: the high nibble carries the sign
    return np.ascontiguousarray(packed, dtype=np.int8)


def unpack_nibbles(packed: np.ndarray, d: int) -> np.ndarray:
    """The inverse of :func:`pack_nibbles`: (ceil(d/2), rows) int8 -> (d, rows) int8."""
    h = packed.shape[0]
    low = np.right_shift(np.left_shift(packed, 4), 4)  # sign-extends the low nibble
    return np.concatenate([low, np.right_shift(packed, 4)[: d - h]])


def decode(kind: int, values: np.ndarray, scale: np.ndarray | None = None,
           offset: np.ndarray | None = None, d: int | None = None,
           col_scale: np.ndarray | None = None) -> np.ndarray:
    """The (rows, d) float32 values of one stored block (``values`` is (d, rows), or the
    (ceil(d/2), rows) packed codes of a 4-bit block, whose ``d`` is then required).
    ``scale``: the per-row scale (the shared ``row_scale`` rows for ``i8s`` / ``i4s``, which
    also need their ``col_scale``)."""
    if kind in NIBBLE_KINDS:
        if d is None:
            raise ValueError("decoding a 4-bit block needs its dimension d")
        values = unpack_nibbles(np.asarray(values), d)
    x = np.asarray(values).T.astype(np.float32)
    if kind in SHARED_KINDS:
        assert col_scale is not None
        x = x * col_scale.astype(np.float32)[None, :]
    if kind not in (KIND_F32, KIND_F16):
        assert scale is not None
        x = x * scale.astype(np.float32)[:, None]
        if offset is not None:
            x = x + offset.astype(np.float32)[:, None]
    return x
