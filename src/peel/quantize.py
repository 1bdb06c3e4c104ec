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

One scale per item row is FBGEMM's fused row-wise layout (Guan et al. 2019 measured it neutral
for recommendation quality at 8 bits). Codes are rounded to nearest and lie in [-127, 127].
Everything here is numpy only: :mod:`peel.device` uses :func:`decode` to hand out float views.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from peel.budget import BLOCK_ALIGN, BLOCK_KINDS, KIND_F16, KIND_F32, KIND_I4, KIND_I8, KIND_I8O

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


def _f16_up(values: np.ndarray) -> np.ndarray:
    """Float16 of non-negative ``values``, one step up wherever rounding went below them."""
    h = values.astype(np.float16)
    low = h.astype(np.float64) < values
    if low.any():
        h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h


def _check_range(x: np.ndarray, limit: float, what: str, where: str) -> None:
    peak = float(np.abs(x).max(initial=0.0))
    if peak > limit:
        raise PrecisionError(f"{where}: {what} {peak:.4g} is beyond float16's range "
                             f"({F16_MAX:g}); store this block as float32 (--precision fp32)")


def encode(x: np.ndarray, kind: int, where: str = "block") -> Encoded:
    """Encode one (rows, d) block at ``kind`` (a :data:`BLOCK_KINDS` code)."""
    rows = np.asarray(x, dtype=np.float64)
    if rows.ndim != 2:
        raise ValueError(f"{where}: expected a (rows, d) block, got shape {rows.shape}")
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
    scale = _f16_up(radius / top).astype("<f2")
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
           offset: np.ndarray | None = None, d: int | None = None) -> np.ndarray:
    """The (rows, d) float32 values of one stored block (``values`` is (d, rows), or the
    (ceil(d/2), rows) packed codes of an ``i4`` block, whose ``d`` is then required)."""
    if kind == KIND_I4:
        if d is None:
            raise ValueError("decoding a 4-bit block needs its dimension d")
        values = unpack_nibbles(np.asarray(values), d)
    x = np.asarray(values).T.astype(np.float32)
    if kind in (KIND_I8, KIND_I8O, KIND_I4):
        assert scale is not None
        x = x * scale.astype(np.float32)[:, None]
        if offset is not None:
            x = x + offset.astype(np.float32)[:, None]
    return x
