"""The on-device runtime: open a package in place, rank every item with Eq. 10, shrink instantly.

This module imports numpy and the standard library only (plus ``peel.budget`` and ``peel.io``,
which are numpy-only themselves): a device runs it without torch or scipy, and
``tests/test_device.py`` checks that ranking never imports them.

Scoring (paper Eq. 10). Item j of item group g keeps the blocks S_g (the package's selection
restricted to g); with u the user's D-vector split into N chunks u_1..u_N of size d,

    r_j = max_k |S_k| / |S_g| * sum_{n in S_g} u . rep(e_j^n)

where ``rep`` places the d-dim block in a D-vector. With ``scale="eq10"`` the factor
max_k |S_k| / |S_g| is applied as written; with ``scale="none"`` (the default, by measurement:
the factor multiplies the noisy one-block scores of tail item groups by up to N, and on gowalla
they then fill the top-20; docs/paper-notes.md) the score is the plain sum over kept blocks.
Two readings of ``rep`` are supported, chosen when the package is built and overridable per
call:

* ``"aligned"``: block n sits at chunk n, so the term is u_n . e_j^n (what a dot product with
  the full embedding computes when the other blocks are zero);
* ``"literal"``: the paper's text, the block repeated N times, so the term is
  (u_1 + ... + u_N) . e_j^n.

With ``weighting="alpha"`` each term is also multiplied by the block's importance weight (how
the blocks entered training; a measured alternative to the paper's unweighted Eq. 10).

The factor (and any weight) is folded into the per-block query, so the
kernel is one contiguous ``(items in group, d) @ (d,)`` product per selected block, accumulated
into the score range of the block's item group (items are stored grouped). Items the user has are
excluded: pass item indices to :meth:`Package.rank` / :meth:`Package.rank_batch`; a package
built for one user may also carry that user's ``seen`` list, applied when ranking the stored user.

Mixed precision (format v4). A kept block may be stored as float16, or as int8 codes with a
float16 scale (and offset) per item row (:mod:`peel.quantize`). Nothing is dequantised ahead of
time: blocks are widened into a cache-sized buffer (the float16 / int8 blocks of a batch of
small item groups stacked together, so that one product covers all of a group's blocks and the
per-call overhead does not grow with the number of blocks; a large group's blocks one tile at a
time), and the per-row scale is applied to the d-dim products, not to the d x rows values:
item j's term is scale_j * (q . code_j) + offset_j * sum(q). float16 values and scales are
decoded with integer shifts (the float16 bits moved into a float32 exponent and mantissa, the
2^112 exponent bias folded into the query vector), because numpy's own float16 cast is a scalar
loop several times slower than reading the bytes.

Shrinking (:meth:`Package.shrink`) keeps the longest prefix of the stored selection order that
fits the smaller budget; the kept blocks are views of the same memory, nothing is copied.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from peel.budget import (
    FORMAT_NAME,
    FORMAT_VERSION,
    HASHED_PREAMBLE,
    KIND_F16,
    KIND_F32,
    KIND_I4,
    KIND_I4S,
    KIND_I8O,
    MAGIC,
    NIBBLE_KINDS,
    PREAMBLE,
    PREAMBLE_BYTES,
    READABLE_VERSIONS,
    REFINE_KINDS,
    SCALES,
    SHARED_KINDS,
    SIMILARITIES,
    WEIGHTINGS,
    BudgetReport,
    Layout,
    PackageSpec,
    fit,
    full_table_bytes,
    layout,
    parse_budget,
    prefix_sizes,
)
from peel.errors import PeelError
from peel.io import atomic_path, check_input_file, json_depth

#: Scores are split into sets of about n / this many items to find a top-K threshold cheaply.
_TOPK_RUN = 64
#: Rows of a float16 / int8 block decoded at a time: (d, rows) float32 stays in L2 cache.
_TILE = 8192
#: Values (d x rows x blocks) of the float16 / int8 blocks stacked for one batch of item
#: groups: 512 KB as int32 / float32, which stays in L2 cache between widening and product.
_STACK = 1 << 17
#: float16 bits shifted left by 13 are a float32 of the same sign, mantissa and exponent, but
#: with exponent bias 15 instead of 127: its value times 2^112 is the float16's value.
_F16_SHIFT = 13
_F16_BIAS = 112
_F16_MASK = np.int32(-0x70000001)  # 0x8FFFFFFF: clears the sign-extension bits 28..30
#: A package header is a few hundred bytes of flat JSON; these bound what a hostile or corrupt
#: file can make the loader do (a 100k-deep header hit Python's recursion limit).
MAX_HEADER_BYTES = 1 << 20
MAX_HEADER_DEPTH = 8


class PackageError(PeelError):
    """A package file that cannot be used as is; the message names the file and the fix."""


@dataclass(frozen=True)
class Ranking:
    """Top-K for one user, best first; fewer than K entries if fewer items remain."""

    items: np.ndarray  # int64 item indices
    scores: np.ndarray  # float32 Eq. 10 scores
    ids: np.ndarray | None  # original item ids, when the package stores them


@dataclass(frozen=True)
class BatchRanking:
    """Top-K for many users. Row b holds ``n_valid[b]`` entries; the rest are -1 / -inf."""

    items: np.ndarray  # (B, K) int64
    scores: np.ndarray  # (B, K) float32
    n_valid: np.ndarray  # (B,) int64
    ids: np.ndarray | None  # (B, K) int64, padded with -1, when the package stores ids


@dataclass(frozen=True)
class _Mode:
    """How Eq. 10 is read for one call (the package's stored mode unless overridden)."""

    similarity: str
    weighting: str
    scale: str


class _ItemOrder:
    """Row <-> item maps, derived once from the item-group labels and shared by every shrink.

    Rows are items sorted by item group, ties by item index (a stable sort), which is how the
    server wrote them; storing the labels (1 byte per item) instead of the permutation (4)
    leaves more of the budget for blocks.
    """

    def __init__(self, item_group: np.ndarray) -> None:
        self._labels = item_group
        self._perm: np.ndarray | None = None
        self._inv: np.ndarray | None = None

    @property
    def perm(self) -> np.ndarray:
        """Item index of every row."""
        if self._perm is None:
            self._perm = np.argsort(self._labels, kind="stable").astype(np.int64)
        return self._perm

    @property
    def inv(self) -> np.ndarray:
        """Row of every item index."""
        if self._inv is None:
            inv = np.empty(self.perm.size, dtype=np.int64)
            inv[self.perm] = np.arange(self.perm.size)
            self._inv = inv
        return self._inv


class Package:
    """A package opened for ranking. Arrays are read-only views of the file's memory."""

    def __init__(self, lay: Layout, arrays: Mapping[str, np.ndarray], source: str,
                 order: _ItemOrder | None = None,
                 chunks: list[_Entry] | None = None) -> None:
        self.layout = lay
        self.spec: PackageSpec = lay.spec
        self.budget: int = lay.budget
        self.source = source
        self._arrays = dict(arrays)
        self.group_offsets: np.ndarray = self._arrays["group_offsets"]
        self.item_group: np.ndarray = self._arrays["item_group"]
        self.selection: np.ndarray = self._arrays["selection"]
        self.weights: np.ndarray = self._arrays["weights"]
        self.blocks: np.ndarray = self._arrays["blocks"]
        self.item_ids: np.ndarray | None = self._arrays.get("item_ids")
        self.user_emb: np.ndarray | None = self._arrays.get("user_emb")
        self.seen: np.ndarray | None = self._arrays.get("seen")
        self.row_scale: np.ndarray | None = self._arrays.get("row_scale")
        """One float16 scale per item row, shared by its blocks (format v6 shared kinds)."""
        kinds = self._arrays.get("kinds")
        if kinds is None:  # format v3: every block float32
            kinds = np.zeros(self.selection.shape[0], dtype=np.uint8)
            kinds.flags.writeable = False
        self.kinds: np.ndarray = kinds
        """The :data:`peel.budget.BLOCK_KINDS` code of every selected block (v3: all f32)."""
        self._order = order if order is not None else _ItemOrder(self.item_group)
        self._chunks = chunks
        self._groups: list[list[int]] | None = None
        self._plan: _Plan | None = None
        self._cols: np.ndarray | None = None
        self._rows = prefix_sizes(self.spec, self.selection, self.kinds)
        blocks = self.selection[~self.refinements(), 0].astype(np.int64)
        counts = np.bincount(blocks, minlength=self.spec.n_groups)
        self.factors: np.ndarray = counts.max() / counts
        """Eq. 10's max_k |S_k| / |S_g| for every item group g (applied when scale="eq10")."""

    # ----------------------------------------------------------------- description

    @property
    def n_items(self) -> int:
        return self.spec.n_items

    @property
    def n_selected(self) -> int:
        return int(self.selection.shape[0])

    @property
    def report(self) -> BudgetReport:
        return self.layout.report

    @property
    def similarity(self) -> str:
        return self.spec.similarity

    @property
    def weighting(self) -> str:
        return self.spec.weighting

    @property
    def scale(self) -> str:
        return self.spec.scale

    @property
    def precision(self) -> str:
        return self.spec.precision

    def kind_counts(self) -> dict[str, int]:
        """How many selected blocks are stored at each kind its format knows (f32, f16, i8,
        i8o; i4 from v5 on)."""
        table = self.spec.block_kinds
        counts = np.bincount(self.kinds.astype(np.int64), minlength=len(table))
        return {name: int(c) for name, c in zip(table, counts, strict=True)}

    def minimum_budget(self) -> int:
        """The smallest budget this package can shrink to (one block per item group)."""
        from peel.budget import minimum_budget

        return minimum_budget(self.spec, self.selection, self.kinds)

    def refinements(self) -> np.ndarray:
        """Which selected entries refine a block kept before them (kind "r4s") rather than
        being a block of their own."""
        return np.isin(self.kinds, REFINE_KINDS)

    def block_sets(self) -> list[np.ndarray]:
        """The selected block indices of every item group, in selection order (a refined
        block once)."""
        sel = self.selection[~self.refinements()].astype(np.int64)
        return [sel[sel[:, 0] == g, 1] for g in range(self.spec.n_groups)]

    def item_blocks(self, group: int, block: int) -> np.ndarray | None:
        """The (items in group, d) values of one selected block, rows in stored item order:
        a view for a float32 block, the decoded float32 values (a copy) otherwise, its
        refinement added when the package holds one."""
        hits = np.flatnonzero((self.selection[:, 0] == group) & (self.selection[:, 1] == block))
        if hits.size == 0:
            return None
        entries = [self._kernel()[int(i)] for i in hits]
        if entries[0].kind == KIND_F32:
            return entries[0].values.T
        from peel.quantize import decode

        total = None
        for entry in entries:
            values = entry.values.view(np.float16) if entry.kind == KIND_F16 else entry.values
            scale = None if entry.scale is None else entry.scale.view(np.float16)
            offset = None if entry.offset is None else entry.offset.view(np.float16)
            x = decode(entry.kind, values, scale, offset, d=self.spec.block_dim,
                       col_scale=entry.cols)
            total = x if total is None else total + x
        return total

    def describe(self) -> dict[str, Any]:
        """Header facts plus the budget report, for ``--json`` output and logs."""
        spec = self.spec
        return {
            "source": self.source, "n_items": spec.n_items, "n_blocks": spec.n_blocks,
            "block_dim": spec.block_dim, "n_item_groups": spec.n_groups,
            "similarity": spec.similarity, "weighting": spec.weighting,
            "scale": spec.scale, "selection": spec.selection, "seed": spec.seed,
            "group": spec.group, "user": spec.user, "n_seen": spec.n_seen,
            "has_item_ids": spec.item_ids, "precision": spec.precision,
            "format_version": spec.version, "block_kinds": self.kind_counts(),
            "report": self.report.to_dict(),
        }

    # ----------------------------------------------------------------- shrinking

    def shrink(self, budget: int | float | str) -> Package:
        """The same package at a smaller budget: drops the tail of the selection order.

        Never drops an item group's last block (the first G selected blocks are one per group)
        and copies nothing: the result's arrays are views of this package's memory. The result
        equals, block for block and byte for byte once saved, a package built at that budget.
        """
        nbytes = parse_budget(budget, full_table_bytes(self.n_items, self.spec.dim))
        complete = self.n_selected == self.spec.n_pairs
        if nbytes > self.budget and not complete:
            raise PackageError(
                f"{self.source}: cannot grow from {self.budget:,} B to {nbytes:,} B on the "
                f"device; the blocks beyond this package come from the server (peel deploy)")
        lay = fit(self.spec, self.selection, nbytes, rows=self._rows)
        k = lay.n_selected
        unit = 1 if self.spec.mixed else self.spec.block_dim  # bytes, or float32 per row
        arrays = {**self._arrays, "selection": self.selection[:k], "weights": self.weights[:k],
                  "blocks": self.blocks[: int(self._rows[k]) * unit]}
        if "kinds" in arrays:
            arrays["kinds"] = self.kinds[:k]
        chunks = None if self._chunks is None else self._chunks[:k]
        return Package(lay, arrays, self.source, self._order, chunks)

    def save(self, path: str | os.PathLike[str]) -> BudgetReport:
        """Write this package (e.g. after :meth:`shrink`) atomically, with a fresh checksum."""
        return write_package(path, self.layout, self._arrays)

    # ----------------------------------------------------------------- scoring

    def _kernel(self) -> list[_Entry]:
        """One entry per selected block (its rows and views of its stored arrays), built on
        first use and shared by every package shrunk from this one."""
        if self._chunks is None:
            shared = None if self.row_scale is None else self.row_scale.view("<i2")
            self._chunks = _entries(self.spec, self.selection, self.kinds, self.blocks,
                                    self.group_offsets, self._rows, shared)
        return self._chunks

    def _col_scales(self) -> np.ndarray | None:
        """(k, d) float32: each selected block's scale per dimension (1 but for the shared
        kinds), folded into its query; ``None`` when no block has one."""
        if self._cols is None and self.row_scale is not None:
            cols = np.ones((self.n_selected, self.spec.block_dim), dtype=np.float32)
            for i, entry in enumerate(self._kernel()):
                if entry.cols is not None:
                    cols[i] = entry.cols
            self._cols = cols
        return self._cols

    def _queries(self, users: np.ndarray, mode: _Mode) -> np.ndarray:
        """(k, B, d) float32: the user chunk each selected block is dotted with, times Eq. 10's
        factor for the block's item group (scale="eq10") and the block's weight ("alpha")."""
        spec = self.spec
        chunks = users.reshape(users.shape[0], spec.n_blocks, spec.block_dim)
        sel = self.selection.astype(np.int64)
        scale = (self.factors[sel[:, 0]] if mode.scale == "eq10"
                 else np.ones(sel.shape[0], dtype=np.float64))
        if mode.weighting == "alpha":
            scale = scale * self.weights
        scale = scale.astype(np.float32)[:, None, None]
        cols = self._col_scales()
        if cols is not None:  # a shared-scale block's scale per dimension joins the query
            scale = scale * cols[:, None, :]
        nibbles = np.isin(self.kinds, NIBBLE_KINDS)
        if nibbles.any():  # 4-bit codes are widened as 16 x code (_widen_codes)
            scale = scale * np.where(nibbles, _NIBBLE_STEP, 1).astype(np.float32)[:, None, None]
        if mode.similarity == "aligned":
            q = chunks[:, sel[:, 1], :].transpose(1, 0, 2) * scale
        else:
            q = chunks.sum(axis=1, dtype=np.float32)[None, :, :] * scale
        return np.ascontiguousarray(q, dtype=np.float32)

    def _by_group(self) -> list[list[int]]:
        """The selected blocks of every item group (indices into the selection), in order."""
        if self._groups is None:
            groups: list[list[int]] = [[] for _ in range(self.spec.n_groups)]
            for i, g in enumerate(self.selection[:, 0].tolist()):
                groups[g].append(i)
            self._groups = groups
        return self._groups

    def _group_plan(self) -> _Plan:
        """How :meth:`_row_scores` walks the item groups (cached; shrinking builds a new one).

        Consecutive item groups whose float16 / int8 blocks fit one stacked buffer together
        form a batch; a group too large for it (or for :data:`_TILE` rows) is a batch of its
        own, scored block by block in tiles.
        """
        if self._plan is not None:
            return self._plan
        entries, off, d = self._kernel(), self.group_offsets, self.spec.block_dim
        f16_order: list[int] = []
        i8_order: list[int] = []
        s8_order: list[int] = []
        batches: list[_Batch] = []
        current: list[_GroupPlan] = []
        used = [0, 0, 0]  # int32 values (float16 tiles), float32 values (int8 codes), rows

        def flush() -> None:
            if current:
                batches.append(_Batch(list(current), False, used[0], used[2],
                                      any(gp.has_offset for gp in current)))
                current.clear()
                used[:] = [0, 0, 0]

        for g, kept in enumerate(self._by_group()):
            lo, hi = int(off[g]), int(off[g + 1])
            n = hi - lo
            f32 = [(i, entries[i]) for i in kept if entries[i].kind == KIND_F32]
            f16 = [i for i in kept if entries[i].kind == KIND_F16]
            s8 = _nibbles_first(entries, [i for i in kept if entries[i].kind in SHARED_KINDS])
            i8 = _nibbles_first(entries, [
                i for i in kept if entries[i].kind not in (KIND_F32, KIND_F16, *SHARED_KINDS)])
            need16, need8 = n * d * len(f16), n * d * (len(i8) + len(s8))
            large = max(need16, need8) > _STACK or n > _TILE
            if large or used[0] + need16 > _STACK or used[1] + need8 > _STACK:
                flush()
            i8_entries, s8_entries = [entries[i] for i in i8], [entries[i] for i in s8]
            gp = _GroupPlan(lo, hi, f32, [entries[i] for i in f16], i8_entries,
                            any(entries[i].offset is not None for i in i8),
                            used[0], used[1], used[2], len(f16_order), len(i8_order),
                            f16, i8, s8_entries, len(s8_order), s8,
                            _stack(i8_entries), _stack(s8_entries))
            f16_order += f16
            i8_order += i8
            s8_order += s8
            if large:
                batches.append(_Batch([gp], True, 0, 0, gp.has_offset))
                continue
            current.append(gp)
            used[0] += need16
            used[1] += need8
            used[2] += n * (len(i8) + (len(s8) > 0))  # the shared kinds: one row scale
        flush()
        self._plan = _Plan(batches, np.asarray(f16_order, dtype=np.int64),
                           np.asarray(i8_order, dtype=np.int64),
                           np.asarray(s8_order, dtype=np.int64))
        return self._plan

    def _row_scores(self, user: np.ndarray, mode: _Mode) -> np.ndarray:
        """Eq. 10 for one user over all rows (items in stored order).

        A float32 block costs one product call. The float16 blocks of a batch of small item
        groups are widened into one stacked int32 buffer (one call per block), their bits moved
        into float32 positions by one shift and one mask for the whole batch, and each group's
        blocks multiplied by one (blocks x d)-vector: one product per group, not per block.
        The int8 blocks are stacked the same way (codes widened to float32, per-row scales
        widened and shifted once per batch) and multiplied by one batched product per group;
        the scales then multiply the group's d-dim products, not its d x rows values. Blocks
        whose row scale is shared (``i8s`` / ``i4s``) are stacked after them and need one
        product for the whole group and one multiply by its rows' scale. Large
        groups go block by block in cache-sized tiles (:meth:`_group_by_block`). Buffers stay
        a few hundred KB (:data:`_STACK`).
        """
        q = self._queries(user[None, :], mode)[:, 0, :]
        queries = list(q)
        scores = np.empty(self.n_items, dtype=np.float32)
        plan = self._group_plan()
        folded = _FoldedQuery(q) if self.spec.mixed else None
        d = self.spec.block_dim
        scratch = _SCRATCH.get(d, 1, self.spec.n_blocks)
        q16 = q8 = qsum8 = qs8 = np.zeros((0, 1, d), dtype=np.float32)  # mixed packages only
        post = np.float32(1)
        if folded is not None:
            q16 = folded.q[plan.f16_order].reshape(-1)
            qs8 = folded.q[plan.s8_order].reshape(-1)
            q8 = folded.q[plan.i8_order][:, None, :]
            qsum8 = folded.qsum[plan.i8_order][:, None]
            post = folded.post
        ints, floats = scratch.stack_ints, scratch.stack_floats
        scl, offs, prods = scratch.stack_scale, scratch.stack_offset, scratch.stack_prod
        for batch in plan.batches:
            if batch.by_block:
                self._group_by_block(batch.groups[0], queries, folded, scores, scratch)
                continue
            for gp in batch.groups:  # widen every float16 / int8 block of the batch
                n = gp.hi - gp.lo
                at = gp.f16_at
                for entry in gp.f16:
                    np.copyto(ints[at: at + d * n].reshape(d, n), entry.values,
                              casting="unsafe")
                    at += d * n
                at, row, k8 = gp.i8_at, gp.row_at, len(gp.i8)
                if k8:
                    _widen_stack(gp.i8_stack, floats[at: at + k8 * d * n], d, n)
                    np.concatenate(gp.i8_stack.scales, out=scl[row: row + k8 * n],
                                   casting="unsafe")
                    for j, entry in enumerate(gp.i8 if gp.has_offset else ()):
                        r = row + j * n
                        if entry.offset is None:
                            offs[r: r + n] = 0
                        else:
                            np.copyto(offs[r: r + n], entry.offset, casting="unsafe")
                    at += k8 * d * n
                    row += k8 * n
                if gp.s8:  # after the int8 codes; their one row scale after theirs
                    _widen_stack(gp.s8_stack, floats[at: at + len(gp.s8) * d * n], d, n)
                    np.copyto(scl[row: row + n], gp.s8[0].scale, casting="unsafe")
            if batch.f16_values:
                bits = ints[: batch.f16_values]
                np.left_shift(bits, _F16_SHIFT, out=bits)
                np.bitwise_and(bits, _F16_MASK, out=bits)
            if batch.i8_rows:
                np.left_shift(scl[: batch.i8_rows], _F16_SHIFT, out=scl[: batch.i8_rows])
                if batch.has_offset:
                    o = offs[: batch.i8_rows]
                    np.left_shift(o, _F16_SHIFT, out=o)
                    np.bitwise_and(o, _F16_MASK, out=o)
            for gp in batch.groups:
                n = gp.hi - gp.lo
                if n == 0:
                    continue
                k16, k8, ks = len(gp.f16), len(gp.i8), len(gp.s8)
                n_terms = len(gp.f32) + (k16 > 0) + (k8 > 0) + (ks > 0)
                out = scores[gp.lo: gp.hi]
                terms = (out[None, :] if n_terms == 1
                         else scratch.terms[: n_terms * n].reshape(n_terms, n))
                t = 0
                for i, entry in gp.f32:
                    np.matmul(queries[i], entry.values, out=terms[t])
                    t += 1
                if k16:
                    tile = ints[gp.f16_at: gp.f16_at + k16 * d * n].view(np.float32)
                    np.matmul(q16[gp.f16_q * d: (gp.f16_q + k16) * d],
                              tile.reshape(k16 * d, n), out=terms[t])
                    if post != 1:
                        np.multiply(terms[t], post, out=terms[t])
                    t += 1
                if k8:
                    prod = prods[gp.row_at: gp.row_at + k8 * n].reshape(k8, 1, n)
                    np.matmul(q8[gp.i8_q: gp.i8_q + k8],
                              floats[gp.i8_at: gp.i8_at + k8 * d * n].reshape(k8, d, n),
                              out=prod)
                    prod = prod.reshape(k8, n)
                    rows = slice(gp.row_at, gp.row_at + k8 * n)
                    np.multiply(prod, scl[rows].view(np.float32).reshape(k8, n), out=prod)
                    if gp.has_offset:
                        off = offs[rows].view(np.float32).reshape(k8, n)
                        np.multiply(off, qsum8[gp.i8_q: gp.i8_q + k8], out=off)
                        np.add(prod, off, out=prod)
                    np.add.reduce(prod, axis=0, out=terms[t])
                    if post != 1:
                        np.multiply(terms[t], post, out=terms[t])
                    t += 1
                if ks:  # one product over every shared-scale block, then the row scale once
                    at = gp.i8_at + k8 * d * n
                    np.matmul(qs8[gp.s8_q * d: (gp.s8_q + ks) * d],
                              floats[at: at + ks * d * n].reshape(ks * d, n), out=terms[t])
                    row = gp.row_at + k8 * n
                    np.multiply(terms[t], scl[row: row + n].view(np.float32), out=terms[t])
                    if post != 1:
                        np.multiply(terms[t], post, out=terms[t])
                if n_terms > 1:
                    np.add.reduce(terms, axis=0, out=out)
        return scores

    def _group_by_block(self, gp: _GroupPlan, queries: list[np.ndarray],
                        folded: _FoldedQuery | None, scores: np.ndarray,
                        scratch: _Buffers) -> None:
        """One large item group, block by block in tiles of :data:`_TILE` rows: a stacked tile
        of its float16 / int8 blocks would not fit in cache, and the per-call overhead that
        stacking saves is small against the rows of one block."""
        kept = [*gp.f32, *zip(gp.f16_sel, gp.f16, strict=True),
                *zip(gp.i8_sel, gp.i8, strict=True)]
        n_terms = len(kept) + (len(gp.s8) > 0)  # the shared-scale blocks: one term
        lo, hi = gp.lo, gp.hi
        for a in range(lo, hi, _TILE):
            b = min(a + _TILE, hi)
            whole = a == lo and b == hi
            out = scores[a:b]
            terms = scratch.terms[: n_terms * (b - a)].reshape(n_terms, b - a)
            rows = [out] if n_terms == 1 else list(terms)
            for row, (i, entry) in zip(rows, kept, strict=False):
                if entry.kind == KIND_F32:
                    np.matmul(queries[i], entry.values if whole else
                              entry.values[:, a - lo: b - lo], out=row)
                else:
                    assert folded is not None
                    _decoded_tile(entry, a - lo, b - lo, folded.q[i], folded.qsum[i],
                                  folded.post, row, scratch)
            if gp.s8:
                assert folded is not None
                _shared_term(gp, a - lo, b - lo, folded, rows[-1], scratch)
            if n_terms > 1:
                np.add.reduce(terms, axis=0, out=out)

    def _row_scores_batch(self, users: np.ndarray, mode: _Mode) -> np.ndarray:
        """Eq. 10 for a batch of users: (B, rows)."""
        q = self._queries(users, mode)
        scores = np.empty((users.shape[0], self.n_items), dtype=np.float32)
        groups = self.spec.n_groups
        folded = _FoldedQuery(q) if self.spec.mixed else None
        batch = users.shape[0]
        tile = _TILE if batch <= 32 else max(64, _TILE * 32 // batch)  # terms stay ~1 MB
        scratch = _SCRATCH.get(self.spec.block_dim, batch * tile // _TILE + 1, 1)
        for i, entry in enumerate(self._kernel()):
            seg = scores[:, entry.lo: entry.hi]
            if entry.kind == KIND_F32:
                if i < groups:  # the first G blocks cover each item group exactly once
                    np.matmul(q[i], entry.values, out=seg)
                else:
                    seg += q[i] @ entry.values
                continue
            assert folded is not None
            n = entry.hi - entry.lo
            for a in range(0, n, tile):
                b = min(a + tile, n)
                t = scratch.terms[: batch * (b - a)].reshape(batch, b - a)
                _decoded_tile(entry, a, b, folded.q[i], folded.qsum[i], folded.post, t,
                              scratch)
                if i < groups:
                    np.copyto(seg[:, a:b], t)
                else:
                    np.add(seg[:, a:b], t, out=seg[:, a:b])
        return scores

    def scores(self, users: np.ndarray | None = None, similarity: str | None = None,
               weighting: str | None = None, scale: str | None = None) -> np.ndarray:
        """Eq. 10 scores in item-index order: (n_items,) for a vector, (B, n_items) for rows."""
        mode = self._mode(similarity, weighting, scale)
        if users is None:
            return self._row_scores(self._stored_user(), mode)[self._order.inv]
        u = np.asarray(users)
        if u.ndim == 1:  # the same kernel as rank(), so the scores agree to the bit
            return self._row_scores(self._check_users(u[None, :])[0], mode)[self._order.inv]
        return self._row_scores_batch(self._check_users(u), mode)[:, self._order.inv]

    # ----------------------------------------------------------------- ranking

    def rank(self, user: np.ndarray | None = None, k: int = 50,
             exclude: Iterable[int] | np.ndarray | None = None,
             similarity: str | None = None, weighting: str | None = None,
             scale: str | None = None) -> Ranking:
        """Top-``k`` items for one user, never returning an excluded item.

        ``user=None`` ranks the stored user and also excludes the stored ``seen`` list; an
        explicit vector excludes only ``exclude``. Ties are broken by lower item index.
        ``similarity`` / ``weighting`` / ``scale`` override the package's stored scoring mode.
        """
        mode = self._mode(similarity, weighting, scale)
        k = _check_k(k)
        if user is None:
            u = self._stored_user()
            stored = self.seen
        else:
            vec = np.asarray(user)
            if vec.ndim != 1:
                raise ValueError(f"rank takes one user vector of shape ({self.spec.dim},), got "
                                 f"{vec.shape}; use rank_batch for many users")
            u = self._check_users(vec[None, :])[0]
            stored = None
        scores = self._row_scores(u, mode)
        excluded = self._check_items(exclude, "exclude")
        if stored is not None:
            excluded = np.concatenate([excluded, stored.astype(np.int64)])
        scores[self._order.inv[excluded]] = -np.inf
        rows = _top_rows(scores, k, self._order.perm)
        rows = rows[np.isfinite(scores[rows])]
        items = self._order.perm[rows]
        ids = None if self.item_ids is None else self.item_ids[items].astype(np.int64)
        return Ranking(items=items, scores=scores[rows], ids=ids)

    def rank_batch(self, users: np.ndarray, k: int = 50,
                   exclude_indptr: np.ndarray | None = None,
                   exclude_indices: np.ndarray | None = None,
                   similarity: str | None = None, weighting: str | None = None,
                   scale: str | None = None, batch_size: int = 32) -> BatchRanking:
        """Top-``k`` for every row of ``users`` (B, D), e.g. all test users of one group.

        Exclusions are CSR-like: user b excludes item indices
        ``exclude_indices[exclude_indptr[b]:exclude_indptr[b + 1]]`` (a scipy CSR matrix's
        ``indptr`` / ``indices`` can be passed as they are). The stored ``seen`` list is not
        applied: it belongs to the stored user only.
        """
        mode = self._mode(similarity, weighting, scale)
        k = min(_check_k(k), self.n_items)
        mat = self._check_users(np.asarray(users))
        indptr, indices = self._check_csr(exclude_indptr, exclude_indices, mat.shape[0])
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size}: expected a positive integer")
        n = mat.shape[0]
        items = np.full((n, k), -1, dtype=np.int64)
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        n_valid = np.zeros(n, dtype=np.int64)
        perm, inv = self._order.perm, self._order.inv
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            block = self._row_scores_batch(mat[start:stop], mode)
            lo, hi = indptr[start], indptr[stop]
            owners = np.repeat(np.arange(stop - start), np.diff(indptr[start: stop + 1]))
            block[owners, inv[indices[lo:hi]]] = -np.inf
            for b in range(stop - start):
                row_scores = block[b]
                rows = _top_rows(row_scores, k, perm)
                rows = rows[np.isfinite(row_scores[rows])]
                m = rows.size
                items[start + b, :m] = perm[rows]
                scores[start + b, :m] = row_scores[rows]
                n_valid[start + b] = m
        ids = None
        if self.item_ids is not None:
            ids = np.where(items >= 0, self.item_ids[np.maximum(items, 0)], -1).astype(np.int64)
        return BatchRanking(items=items, scores=scores, n_valid=n_valid, ids=ids)

    # ----------------------------------------------------------------- input checks

    def _mode(self, similarity: str | None, weighting: str | None,
              scale: str | None = None) -> _Mode:
        sim = self.spec.similarity if similarity is None else similarity
        if sim not in SIMILARITIES:
            raise ValueError(f"similarity {sim!r}: choose one of {', '.join(SIMILARITIES)}")
        weigh = self.spec.weighting if weighting is None else weighting
        if weigh not in WEIGHTINGS:
            raise ValueError(f"weighting {weigh!r}: choose one of {', '.join(WEIGHTINGS)}")
        sc = self.spec.scale if scale is None else scale
        if sc not in SCALES:
            raise ValueError(f"scale {sc!r}: choose one of {', '.join(SCALES)}")
        return _Mode(sim, weigh, sc)

    def _stored_user(self) -> np.ndarray:
        if self.user_emb is None:
            raise PackageError(
                f"{self.source}: this package was built for a whole user group and stores no "
                f"user embedding; pass the user's vector, or build the package for one user "
                f"(user=..., peel deploy --user)")
        return self.user_emb

    def _check_users(self, users: np.ndarray) -> np.ndarray:
        dim = self.spec.dim
        if users.ndim != 2 or users.shape[1] != dim:
            raise ValueError(f"user vectors: expected shape (B, {dim}) or ({dim},) for this "
                             f"package, got {users.shape}")
        if not np.issubdtype(users.dtype, np.floating) and not np.issubdtype(users.dtype,
                                                                             np.integer):
            raise ValueError(f"user vectors: expected real numbers, got dtype {users.dtype}")
        out = np.ascontiguousarray(users, dtype=np.float32)
        if not np.all(np.isfinite(out)):
            raise ValueError("user vectors: every value must be finite")
        return out

    def _check_items(self, items: Iterable[int] | np.ndarray | None, what: str) -> np.ndarray:
        if items is None:
            return np.zeros(0, dtype=np.int64)
        arr = np.asarray(items if isinstance(items, np.ndarray) else list(items))
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{what}: expected a 1-D list of integer item indices")
        arr = arr.astype(np.int64)
        bad = arr[(arr < 0) | (arr >= self.n_items)]
        if bad.size:
            raise ValueError(f"{what}: item index {int(bad[0])} is outside [0, {self.n_items}) "
                             f"for this package")
        return arr

    def _check_csr(self, indptr: np.ndarray | None, indices: np.ndarray | None,
                   n_users: int) -> tuple[np.ndarray, np.ndarray]:
        if indptr is None and indices is None:
            return np.zeros(n_users + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
        if indptr is None or indices is None:
            raise ValueError("exclusions: give both exclude_indptr and exclude_indices")
        ptr = np.asarray(indptr)
        if (ptr.ndim != 1 or ptr.size != n_users + 1 or not np.issubdtype(ptr.dtype, np.integer)):
            raise ValueError(f"exclude_indptr: expected {n_users + 1} integers (one more than "
                             f"users), got shape {ptr.shape}")
        ptr = ptr.astype(np.int64)
        idx = self._check_items(np.asarray(indices).ravel(), "exclude_indices")
        if ptr[0] != 0 or np.any(np.diff(ptr) < 0) or ptr[-1] != idx.size:
            raise ValueError("exclude_indptr: must start at 0, never decrease and end at "
                             "len(exclude_indices)")
        return ptr, idx


# --------------------------------------------------------------------------- block kernels


class _Entry(NamedTuple):
    """One selected block: its item rows [lo, hi) and views of what is stored for it."""

    lo: int
    hi: int
    values: np.ndarray  # (d, rows): float32, float16 bits as int16, or int8 codes
    kind: int
    scale: np.ndarray | None  # (rows,) float16 bits as int16 (int8 / 4-bit kinds)
    offset: np.ndarray | None  # (rows,) float16 bits as int16 (kind i8o)
    cols: np.ndarray | None = None  # (d,) float32 scale per dimension (shared-scale kinds)


def _entries(spec: PackageSpec, selection: np.ndarray, kinds: np.ndarray,
             blocks: np.ndarray, offsets: np.ndarray,
             sizes: np.ndarray | None = None,
             row_scale: np.ndarray | None = None) -> list[_Entry]:
    """Views of every selected block in the payload (no copies). A shared-scale block's row
    scale is its rows of the package's ``row_scale`` (float16 bits as int16)."""
    d = spec.block_dim
    sizes = prefix_sizes(spec, selection, kinds) if sizes is None else sizes
    out = []
    for i, g in enumerate(np.asarray(selection)[:, 0].tolist()):
        lo, hi = int(offsets[g]), int(offsets[g + 1])
        n = hi - lo
        if not spec.mixed:
            start = int(sizes[i]) * d
            out.append(_Entry(lo, hi, blocks[start: start + n * d].reshape(d, n), KIND_F32,
                              None, None))
            continue
        raw = blocks[int(sizes[i]): int(sizes[i + 1])]
        kind = int(kinds[i])
        scale = offset = cols = None
        if kind == KIND_F32:
            values = raw[: 4 * d * n].view("<f4").reshape(d, n)
        elif kind == KIND_F16:
            values = raw[: 2 * d * n].view("<i2").reshape(d, n)
        else:
            if kind in SHARED_KINDS:
                if row_scale is None:
                    raise PackageError("a shared-scale block needs the package's row_scale")
                scale, cols, start = row_scale[lo:hi], raw[: 4 * d].view("<f4"), 4 * d
            else:
                scale, start = raw[: 2 * n].view("<i2"), 2 * n
            if kind == KIND_I8O:
                offset = raw[start: start + 2 * n].view("<i2")
                start += 2 * n
            rows = (d + 1) // 2 if kind in NIBBLE_KINDS else d  # 4-bit codes: two dims a byte
            values = raw[start: start + rows * n].view(np.int8).reshape(rows, n)
        out.append(_Entry(lo, hi, values, kind, scale, offset, cols))
    return out


def _check_entries(entries: list[_Entry]) -> str | None:
    """What is wrong with the stored values of a mixed-precision package, if anything."""
    exponent = 0x7C00  # float16 exponent bits; all set = infinity or NaN
    for e in entries:
        if e.kind == KIND_F32 and not _all_finite(e.values):
            return "block values must be finite (found NaN or infinity)"
        if e.kind == KIND_F16 and np.any((e.values & exponent) == exponent):
            return "float16 block values must be finite (found NaN or infinity)"
        if e.scale is not None and (np.any(e.scale < 0)
                                    or np.any((e.scale & exponent) == exponent)):
            return "int8 block scales must be finite and non-negative"
        if e.offset is not None and np.any((e.offset & exponent) == exponent):
            return "int8 block offsets must be finite"
        if e.cols is not None and not (np.all(np.isfinite(e.cols)) and np.all(e.cols >= 0)):
            return "block column scales must be finite and non-negative"
    return None


class _FoldedQuery:
    """Queries for float16 / int8 blocks: q * 2^e, so that the float16-as-float32 bits (2^112
    too small) need no per-value rescaling, and ``post`` = 2^(112 - e) for the rest.

    e is 112 unless the user vector is so large that q . code could overflow float32 before
    the scale multiplies it; then the remaining power of two is applied to each tile's result.
    """

    def __init__(self, q: np.ndarray) -> None:
        d = q.shape[-1]
        peak = float(np.abs(q).max(initial=0.0))
        exp = _F16_BIAS if peak == 0 else min(_F16_BIAS, 126 - math.frexp(peak * d * 127)[1])
        self.q = (q * np.float32(2.0 ** exp)).astype(np.float32)
        self.qsum = self.q.sum(axis=-1, dtype=np.float32)
        self.post = np.float32(2.0 ** (_F16_BIAS - exp))


class _Buffers:
    """Decode and product buffers for one thread (about 1.8 MB at d = 8 and 16 blocks, whatever
    the catalogue size; reused across calls)."""

    def __init__(self, d: int, batch: int, blocks: int) -> None:
        self.key = (d, batch, blocks)
        self.sizes = (_STACK, _TILE)
        # the stacked tiles of _row_scores (float16 bits as int32, int8 codes as float32; the
        # int8 blocks' scales, offsets and products, one value per block and row); the tiles
        # of the block-by-block kernels are their first parts (never used at the same time)
        stack = max(_STACK, d * _TILE)
        per_row = stack // d
        self.stack_ints = np.empty(stack, dtype=np.int32)
        self.stack_floats = np.empty(stack, dtype=np.float32)
        self.stack_scale = np.empty(per_row, dtype=np.int32)
        self.stack_offset = np.empty(per_row, dtype=np.int32)
        self.stack_prod = np.empty(per_row, dtype=np.float32)
        self.floats = self.stack_floats[: d * _TILE]  # a decoded tile, (d, rows)
        self.ints = self.stack_ints[: d * _TILE]  # float16 bits being widened
        self.scale = self.stack_scale[:_TILE]
        self.offset = self.stack_offset[:_TILE]
        self.terms = np.empty((max(batch, blocks) + 2) * _TILE, dtype=np.float32)  # terms

    @property
    def nbytes(self) -> int:
        """Bytes held (the extra memory ranking needs besides the package and the scores)."""
        return sum(a.nbytes for a in (self.stack_ints, self.stack_floats, self.stack_scale,
                                      self.stack_offset, self.stack_prod, self.terms))


class _Scratch(threading.local):
    """Per-thread :class:`_Buffers`, grown on demand, so concurrent rankings never share."""

    buffers: _Buffers | None = None

    def get(self, d: int, batch: int, blocks: int) -> _Buffers:
        have = self.buffers
        if (have is None or have.sizes != (_STACK, _TILE) or have.key[0] != d
                or any(x < y for x, y in zip(have.key[1:], (batch, blocks), strict=True))):
            # the stacked buffers' rows depend on d exactly (a smaller d needs more rows)
            key = (d, batch, blocks) if have is None else (
                d, max(have.key[1], batch), max(have.key[2], blocks))
            have = self.buffers = _Buffers(*key)
        return have


_SCRATCH = _Scratch()


def _f16_bits_as_f32(bits: np.ndarray, out: np.ndarray, signed: bool) -> np.ndarray:
    """float16 bits (int16) -> float32 of value x * 2^-112, written into int32 ``out``."""
    np.left_shift(bits, _F16_SHIFT, out=out, dtype=np.int32)  # widening sign-extends
    if signed:
        np.bitwise_and(out, _F16_MASK, out=out)
    return out.view(np.float32)


#: A 4-bit code comes out of :func:`_widen_codes` as 16 x code; its query carries the 1/16.
_NIBBLE_STEP = np.float32(1 / 16)
_HIGH_NIBBLES = np.int32(-0x0F0F0F10)  # 0xF0F0F0F0: the high nibble of every byte of a word


def _widen_codes(codes: np.ndarray, kind: int, out: np.ndarray) -> None:
    """int8 codes (d, m) as float32 into ``out`` (d, m); 4-bit ones packed (ceil(d/2), m) as
    16 x code (the query of a 4-bit block is divided by 16 instead, exactly). Leading
    dimensions are blocks: (k, h, m) codes into (k, d, m), each block's rows in place.

    A packed byte holds dim j low and dim j + ceil(d/2) high. Masking a byte's high nibble
    gives 16 x the high code, and shifting the byte left by 4 gives 16 x the low one, both
    with their signs, so no per-value sign extension is needed; done on 32-bit words, four
    bytes per operation, then one widening copy like an int8 block's. (numpy's int8 shifts
    into float32 cost about four times that copy.)
    """
    if kind not in NIBBLE_KINDS:
        np.copyto(out, codes, casting="unsafe")
        return
    h = codes.shape[-2]
    flat = np.ascontiguousarray(codes).reshape(-1)
    parts = np.empty((2, flat.size), dtype=np.int8)
    words = flat.size // 4 * 4
    if words:
        w = flat[:words].view(np.int32)
        low, high = parts[0, :words].view(np.int32), parts[1, :words].view(np.int32)
        np.left_shift(w, 4, out=low)
        np.bitwise_and(low, _HIGH_NIBBLES, out=low)
        np.bitwise_and(w, _HIGH_NIBBLES, out=high)
    if words < flat.size:
        np.left_shift(flat[words:], 4, out=parts[0, words:])
        np.bitwise_and(flat[words:], np.int8(-16), out=parts[1, words:])
    low, high = parts.reshape(2, *codes.shape)
    np.copyto(out[..., :h, :], low, casting="unsafe")
    np.copyto(out[..., h:, :], high[..., : out.shape[-2] - h, :], casting="unsafe")


class _Stack(NamedTuple):
    """The int8 / 4-bit blocks of one small item group, widened together
    (:func:`_widen_stack`): the 4-bit blocks' packed codes first, then the 8-bit ones, the
    order :meth:`Package._group_plan` gives their queries."""

    nibbles: list[np.ndarray]  # (ceil(d/2), n) packed codes
    codes: list[np.ndarray]  # (d, n) int8 codes
    scales: list[np.ndarray]  # (n,) float16 bits of each block's row scale (per-block kinds)


def _stack(entries: list[_Entry]) -> _Stack:
    return _Stack([e.values for e in entries if e.kind in NIBBLE_KINDS],
                  [e.values for e in entries if e.kind not in NIBBLE_KINDS],
                  [e.scale for e in entries if e.scale is not None])


def _nibbles_first(entries: list[_Entry], selected: list[int]) -> list[int]:
    """``selected`` (indices into ``entries``) with the 4-bit blocks first, each kind in its
    own order: the layout :func:`_widen_stack` writes."""
    return sorted(selected, key=lambda i: entries[i].kind not in NIBBLE_KINDS)


def _widen_stack(stack: _Stack, out: np.ndarray, d: int, n: int) -> None:
    """Widen a group's stacked blocks into ``out`` ((blocks x d) x n float32), a few numpy
    calls for the whole group instead of about ten per block: at ml-1m's size (3,628 items
    in 20 groups) a block is a few hundred bytes, so per-call overhead was the ranking's
    cost (issue 19's latency table: 2-6 ms a user, 50-150x the floor)."""
    if n == 0:
        return
    k = len(stack.nibbles)
    if k:
        codes = stack.nibbles[0] if k == 1 else np.concatenate(stack.nibbles)
        _widen_codes(codes.reshape(k, -1, n), KIND_I4, out[: k * d * n].reshape(k, d, n))
    if stack.codes:
        m = len(stack.codes)
        np.concatenate(stack.codes, out=out[k * d * n: (k + m) * d * n].reshape(m * d, n),
                       casting="unsafe")


def _shared_term(gp: _GroupPlan, a: int, b: int, folded: _FoldedQuery, out: np.ndarray,
                 buffers: _Buffers) -> None:
    """Rows [a, b) of a large group's shared-row-scale blocks, summed, into ``out``: the
    blocks are widened together in sub-tiles that fit the stacked buffer (one product per
    sub-tile for every block) instead of one decode and product per block, whose numpy calls
    cost as much as their values at a few thousand rows; then the row scale once."""
    stack, d = gp.s8_stack, folded.q.shape[-1]
    k = len(gp.s8)
    q = folded.q[gp.s8_sel].reshape(-1)
    step = max(1, _STACK // (k * d))
    for s in range(a, b, step):
        e = min(s + step, b)
        m = e - s
        tile = buffers.stack_floats[: k * d * m]
        _widen_stack(_Stack([v[:, s:e] for v in stack.nibbles],
                            [v[:, s:e] for v in stack.codes], []), tile, d, m)
        np.matmul(q, tile.reshape(k * d, m), out=out[s - a: e - a])
    np.multiply(out, _f16_bits_as_f32(gp.s8[0].scale[a:b], buffers.scale[: b - a],
                                      signed=False), out=out)
    if folded.post != 1:
        np.multiply(out, folded.post, out=out)


def _decoded_tile(entry: _Entry, a: int, b: int, q: np.ndarray,
                  qsum: np.ndarray | np.float32, post: np.float32, out: np.ndarray,
                  buffers: _Buffers) -> None:
    """Write the terms of rows [a, b) (at most one tile) of a float16 / int8 block.

    ``q`` is the block's folded query, (d,) or (B, d) (:class:`_FoldedQuery`); ``out`` is
    (b - a,) or (B, b - a). The rows are decoded into the thread's buffers and multiplied
    there; an int8 block's per-row scale then multiplies the d-dim products, and its offset
    adds offset * sum(q).
    """
    d, m = q.shape[-1], b - a  # the block's dimension (a 4-bit block stores ceil(d/2) rows)
    if entry.kind == KIND_F16:
        tile = _f16_bits_as_f32(entry.values[:, a:b], buffers.ints[: d * m].reshape(d, m),
                                signed=True)
    else:
        tile = buffers.floats[: d * m].reshape(d, m)
        _widen_codes(entry.values[:, a:b], entry.kind, tile)
    np.matmul(q, tile, out=out)
    if entry.scale is not None:
        np.multiply(out, _f16_bits_as_f32(entry.scale[a:b], buffers.scale[:m], signed=False),
                    out=out)
    if entry.offset is not None:
        off = _f16_bits_as_f32(entry.offset[a:b], buffers.offset[:m], signed=True)
        if q.ndim == 1:
            np.multiply(off, qsum, out=off)
            np.add(out, off, out=out)
        else:
            out += np.multiply.outer(qsum, off)
    if post != 1:
        np.multiply(out, post, out=out)


class _GroupPlan(NamedTuple):
    """One item group's rows [lo, hi), its kept blocks by kind, and where its stacked
    float16 / int8 values go in its batch's buffers."""

    lo: int
    hi: int
    f32: list[tuple[int, _Entry]]  # (selection index, entry): one product each
    f16: list[_Entry]  # stacked, one product for all
    i8: list[_Entry]  # int8 with or without offsets: stacked, one batched product
    has_offset: bool
    f16_at: int  # first int32 of its float16 tile in the batch's buffer
    i8_at: int  # first float32 of its int8 codes
    row_at: int  # first of its (blocks x rows) int8 scales / offsets / products
    f16_q: int  # its first float16 block in the call's float16 query order
    i8_q: int
    f16_sel: list[int]  # selection indices of its float16 / int8 blocks
    i8_sel: list[int]
    s8: list[_Entry]  # shared-row-scale blocks (after the int8 codes): one product for all
    s8_q: int
    s8_sel: list[int]
    i8_stack: _Stack  # the int8 / shared-scale blocks' arrays, for _widen_stack
    s8_stack: _Stack


class _Batch(NamedTuple):
    """Consecutive item groups whose stacked values fit the buffers together, or one large
    group (``by_block``)."""

    groups: list[_GroupPlan]
    by_block: bool
    f16_values: int
    i8_rows: int
    has_offset: bool


class _Plan(NamedTuple):
    batches: list[_Batch]
    f16_order: np.ndarray  # selection indices of the float16 blocks, in walking order
    i8_order: np.ndarray
    s8_order: np.ndarray


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k {k!r}: expected a positive integer")
    return int(k)


def _candidates(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows that include every top-``k`` row, usually little more than ``k`` of them.

    Split the scores into m disjoint sets and take t, the k-th largest of the m set maxima:
    k distinct sets hold a score >= t, so the k-th largest score is >= t and every top-k row
    scores >= t. The sets are strided (row i is in set i mod m) so that the maxima are one
    vectorised pass over contiguous memory. This avoids a full argpartition, which costs more
    than the scoring itself at small budgets.
    """
    n = scores.size
    sets = n // _TOPK_RUN
    if sets < 4 * k:
        return np.arange(n)
    maxima = scores[: sets * _TOPK_RUN].reshape(_TOPK_RUN, sets).max(axis=0)
    threshold = np.partition(maxima, sets - k)[sets - k]
    return np.flatnonzero(scores >= threshold)


def _top_rows(scores: np.ndarray, k: int, item_of_row: np.ndarray) -> np.ndarray:
    """The ``k`` best rows, best first; equal scores go to the lower item index."""
    k = min(k, scores.size)
    cand = _candidates(scores, k)
    vals = scores[cand]
    if cand.size > k:
        kth = np.partition(vals, cand.size - k)[cand.size - k]
        above = np.flatnonzero(vals > kth)
        ties = np.flatnonzero(vals == kth)
        ties = ties[np.argsort(item_of_row[cand[ties]], kind="stable")[: k - above.size]]
        keep = np.concatenate([above, ties])
        cand, vals = cand[keep], vals[keep]
    return cand[np.lexsort((item_of_row[cand], -vals))]


# --------------------------------------------------------------------------- reading


def open_package(path: str | os.PathLike[str], verify: bool = True) -> Package:
    """Memory-map a package file and check it; ``verify`` also checks the sha256 digest."""
    p = Path(path)
    try:
        check_input_file(p, "package")  # a FIFO would block open(), a device never end
    except PeelError as err:
        raise PackageError(f"{err}; give a package file written by peel deploy") from None
    try:
        with open(p, "rb") as fh:
            if os.fstat(fh.fileno()).st_size < PREAMBLE_BYTES:
                raise PackageError(f"{p}: not a peel package (only "
                                   f"{os.fstat(fh.fileno()).st_size} bytes); build one with "
                                   f"peel deploy")
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as err:
        raise PackageError(f"{p}: cannot read package ({err.strerror or err})") from err
    return read_package(buf, str(p), verify=verify)


def read_package(buffer: Any, name: str = "<buffer>", verify: bool = True) -> Package:
    """Use a package held in any buffer (bytes, mmap) in place; arrays are views of it."""
    view = memoryview(buffer).cast("B")
    if view.nbytes < PREAMBLE_BYTES:
        raise PackageError(f"{name}: not a peel package (only {view.nbytes} bytes)")
    magic, version, header_len, payload_len, budget, digest = PREAMBLE.unpack_from(view, 0)
    if magic != MAGIC:
        raise PackageError(f"{name}: not a peel package (bad magic bytes); build one with "
                           f"peel deploy")
    if version not in READABLE_VERSIONS:
        raise PackageError(f"{name}: package format version {version} is not supported (this "
                           f"peel reads versions {', '.join(map(str, READABLE_VERSIONS))}); "
                           f"rebuild it with peel deploy")
    if header_len > MAX_HEADER_BYTES:
        raise PackageError(f"{name}: header of {header_len:,} bytes is larger than any package "
                           f"header ({MAX_HEADER_BYTES:,} at most); the file is corrupt, rebuild "
                           f"it with peel deploy")
    data_start = PREAMBLE_BYTES + -(-header_len // 64) * 64
    expected = data_start + payload_len
    if view.nbytes != expected:
        what = "truncated" if view.nbytes < expected else "has trailing bytes"
        raise PackageError(f"{name}: file {what}: the header says {expected:,} bytes, the file "
                           f"has {view.nbytes:,}; copy it again or rebuild with peel deploy")
    if verify:
        h = hashlib.sha256(view[:HASHED_PREAMBLE])
        h.update(view[PREAMBLE_BYTES:])
        if h.digest() != digest:
            raise PackageError(f"{name}: checksum mismatch, the file is corrupt; copy it again "
                               f"or rebuild with peel deploy")
    header = bytes(view[PREAMBLE_BYTES: PREAMBLE_BYTES + header_len])
    lay = _layout_from_header(header, buffer, data_start, budget, name, version)
    arrays = {slot.name: _view(buffer, data_start + slot.offset, slot.dtype, slot.shape)
              for slot in lay.slots}
    _check_contents(lay, arrays, name)
    return Package(lay, arrays, name)


def _view(buffer: Any, offset: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    count = math.prod(shape)
    if count == 0:
        return np.zeros(shape, dtype=dtype)
    return np.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(shape)


def _layout_from_header(header: bytes, buffer: Any, data_start: int, budget: int,
                        name: str, version: int = FORMAT_VERSION) -> Layout:
    """Rebuild the layout from the header and insist it is exactly the one we would write."""
    malformed = f"{name}: malformed package header; rebuild it with peel deploy"
    try:
        text = header.decode("ascii")
        if json_depth(text) > MAX_HEADER_DEPTH:
            raise PackageError(f"{name}: header JSON nested deeper than {MAX_HEADER_DEPTH} "
                               f"levels; the file is corrupt, rebuild it with peel deploy")
        doc = json.loads(text)
        if doc["format"] != FORMAT_NAME or doc["version"] != version:
            raise PackageError(f"{name}: not a {FORMAT_NAME} v{version} header")
        n_groups = _int(doc["n_item_groups"])
        n_items = _int(doc["n_items"])
        payload = len(memoryview(buffer)) - data_start
        if n_groups < 1 or (n_groups + 1) * 8 > payload:
            raise PackageError(malformed)
        offsets = _view(buffer, data_start, "<i8", (n_groups + 1,))
        counts = np.diff(offsets)
        if offsets[0] != 0 or offsets[-1] != n_items or np.any(counts < 0):
            raise PackageError(f"{name}: item group offsets are inconsistent; the file is "
                               f"corrupt, rebuild it with peel deploy")
        arrays = doc["arrays"]
        spec = PackageSpec(
            n_items=n_items, n_blocks=_int(doc["n_blocks"]), block_dim=_int(doc["block_dim"]),
            group_counts=tuple(int(c) for c in counts), similarity=doc["similarity"],
            weighting=doc["weighting"], scale=doc["scale"], selection=doc["selection"],
            seed=_opt_int(doc["seed"]),
            group=_opt_int(doc["group"]), user=_opt_int(doc["user"]),
            user_stored="user_emb" in arrays,
            n_seen=_int(arrays["seen"]["shape"][0]) if "seen" in arrays else 0,
            item_ids="item_ids" in arrays,
            precision=doc["precision"] if version >= 4 else "fp32")
        if spec.version != version:
            raise PackageError(malformed)
        size = _int(arrays["blocks"]["shape"][0])
        block_size = size if spec.mixed else size // max(spec.block_dim, 1)
        lay = layout(spec, _int(doc["n_selected"]), block_size, budget)
    except PackageError:
        raise
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as err:
        raise PackageError(f"{malformed} ({err})") from err
    if lay.header != header:
        raise PackageError(f"{name}: the header does not match the layout this peel version "
                           f"writes; rebuild the package with peel deploy")
    return lay


def _all_finite(values: np.ndarray, chunk: int = 1 << 22) -> bool:
    """``isfinite`` over a (memory-mapped) array in chunks, so checking stays cheap in memory."""
    flat = values.reshape(-1)
    return all(bool(np.isfinite(flat[i: i + chunk]).all()) for i in range(0, flat.size, chunk))


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


def _opt_int(value: Any) -> int | None:
    return None if value is None else _int(value)


def _check_pairs(pairs: np.ndarray, kinds: np.ndarray | None, n_groups: int) -> str | None:
    """What is wrong with the selection's pairs, if anything: each block is selected once, and
    a refinement ("r4s") only after its own block, which is stored as "i4s"."""
    refine = (np.zeros(pairs.size, dtype=bool) if kinds is None
              else np.isin(kinds, REFINE_KINDS))
    if refine[:n_groups].any():
        return "a refinement among the first block of each item group"
    blocks, extra = pairs[~refine], pairs[refine]
    if np.unique(blocks).size != blocks.size or np.unique(extra).size != extra.size:
        return "a block is selected twice"
    if not refine.any():
        return None
    assert kinds is not None
    where = {int(p): i for i, p in enumerate(pairs.tolist()) if not refine[i]}
    for i in np.flatnonzero(refine).tolist():
        base = where.get(int(pairs[i]))
        if base is None or base > i or int(kinds[base]) != KIND_I4S:
            return "a refinement without its 4-bit block before it"
    return None


def _check_contents(lay: Layout, arrays: Mapping[str, np.ndarray], name: str) -> None:
    """Semantic checks the checksum cannot give: a well-formed file with impossible content."""
    spec = lay.spec
    sel = arrays["selection"].astype(np.int64)
    bad = f"{name}: invalid package content ({{}}); rebuild it with peel deploy"
    if sel.shape[0] < spec.n_groups or np.any(sel[:, 0] >= spec.n_groups) or np.any(
            sel[:, 1] >= spec.n_blocks):
        raise PackageError(bad.format("selection out of range"))
    if np.unique(sel[: spec.n_groups, 0]).size != spec.n_groups:
        raise PackageError(bad.format("some item group has no block"))
    kinds = arrays.get("kinds")
    if kinds is not None and np.any(kinds >= len(spec.block_kinds)):
        raise PackageError(bad.format("unknown block kind"))
    problem = _check_pairs(sel[:, 0] * spec.n_blocks + sel[:, 1], kinds, spec.n_groups)
    if problem:
        raise PackageError(bad.format(problem))
    unit = 1 if spec.mixed else spec.block_dim
    if int(prefix_sizes(spec, sel, kinds)[-1]) * unit != arrays["blocks"].size:
        raise PackageError(bad.format("block payload size does not match the selection"))
    labels = arrays["item_group"].astype(np.int64)
    if np.any(labels >= spec.n_groups) or not np.array_equal(
            np.bincount(labels, minlength=spec.n_groups), np.asarray(spec.group_counts)):
        raise PackageError(bad.format("item group labels do not match the group offsets"))
    if not np.all(np.isfinite(arrays["weights"])) or np.any(arrays["weights"] < 0):
        raise PackageError(bad.format("block weights must be finite and non-negative"))
    if "seen" in arrays and np.any((arrays["seen"] < 0) | (arrays["seen"] >= spec.n_items)):
        raise PackageError(bad.format("seen item out of range"))
    if "user_emb" in arrays and not np.all(np.isfinite(arrays["user_emb"])):
        raise PackageError(bad.format("user embedding is not finite"))
    if not spec.mixed and not _all_finite(arrays["blocks"]):
        raise PackageError(bad.format("block values must be finite (found NaN or infinity)"))
    row_scale = arrays.get("row_scale")
    if row_scale is not None:
        bits = row_scale.view("<i2")
        if np.any(bits < 0) or np.any((bits & 0x7C00) == 0x7C00):
            raise PackageError(bad.format("row scales must be finite and non-negative"))
        row_scale = bits
    if spec.mixed:
        problem = _check_entries(_entries(spec, sel, kinds, arrays["blocks"],
                                          arrays["group_offsets"], row_scale=row_scale))
        if problem:
            raise PackageError(bad.format(problem))
    if lay.report.total > lay.budget:
        raise PackageError(bad.format(f"{lay.report.total:,} B exceed the recorded budget "
                                      f"{lay.budget:,} B"))


# --------------------------------------------------------------------------- writing


def write_package(path: str | os.PathLike[str], lay: Layout,
                  arrays: Mapping[str, np.ndarray | Iterable[np.ndarray]]) -> BudgetReport:
    """Write a package atomically, streaming each array (or iterable of parts) once.

    The digest is computed while writing and the preamble is written last, so a crash leaves
    only the temporary file, never a package that looks valid.
    """
    if lay.report.total > lay.budget:
        raise ValueError(f"internal error: layout exceeds its budget ({lay.report.total} > "
                         f"{lay.budget})")
    header = lay.header + b" " * (lay.data_start - PREAMBLE_BYTES - len(lay.header))
    fields = (MAGIC, lay.spec.version, len(lay.header), lay.payload_bytes, lay.budget)
    digest = hashlib.sha256(PREAMBLE.pack(*fields, bytes(32))[:HASHED_PREAMBLE])
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(bytes(PREAMBLE_BYTES))
        _emit(fh, digest, header)
        position = 0
        for slot in lay.slots:
            _emit(fh, digest, bytes(slot.offset - position))
            written = sum(_emit(fh, digest, np.ascontiguousarray(part, dtype=slot.dtype))
                          for part in _parts(arrays[slot.name]))
            if written != slot.nbytes:
                raise ValueError(f"internal error: array {slot.name} has {written} bytes, the "
                                 f"layout expects {slot.nbytes}")
            position = slot.offset + slot.nbytes
        if fh.tell() != lay.file_bytes:
            raise ValueError("internal error: package size differs from its layout")
        fh.seek(0)
        fh.write(PREAMBLE.pack(*fields, digest.digest()))
    return lay.report


def _parts(value: np.ndarray | Iterable[np.ndarray]) -> Iterable[np.ndarray]:
    return (value,) if isinstance(value, np.ndarray) else value


def _emit(fh: Any, digest: Any, data: bytes | np.ndarray) -> int:
    if (data.nbytes if isinstance(data, np.ndarray) else len(data)) == 0:
        return 0  # an empty item group's block; memoryview cannot cast zero-size shapes
    mv = memoryview(data).cast("B")
    fh.write(mv)
    digest.update(mv)
    return mv.nbytes


def shrink_file(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                budget: int | float | str, verify: bool = True) -> BudgetReport:
    """Write ``src`` shrunk to ``budget`` as ``dst``: a prefix copy with a new header."""
    return open_package(src, verify=verify).shrink(budget).save(dst)
