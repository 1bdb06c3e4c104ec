"""Memory budgets for on-device packages: parsing, block selection and byte-exact accounting.

A budget is a promise about what the device stores, so the accounting here is not an estimate:
:func:`layout` computes the package file's exact layout (header, every array, alignment padding)
and :class:`BudgetReport` splits its size into parts. ``report.total`` is the file size plus the
user embedding when the package leaves that to the device, and a package is built only if
``report.total <= budget``.

Block selection follows the paper (Section IV-C4): every item group first gets its
highest-weight block, so every item keeps at least one block; the remaining (group, block) pairs
follow by weight, descending. :func:`selection_order` returns that order for *all* pairs and a
budget always takes the longest prefix that fits (:func:`fit`). Because it is a prefix of one
fixed order, a package built at a smaller budget is exactly a prefix of one built at a larger
budget, which is what lets the device shrink without the server.

This module must stay numpy + stdlib only: ``peel.device`` imports it to re-fit a package to a
smaller budget on the device.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from peel.errors import PeelError

# --- file format constants (shared by the writer in peel.package and the reader in peel.device)
FORMAT_NAME = "peel-package"
#: v4: kept blocks may be float16 or int8 (a ``kinds`` array says which); v3: the header records
#: Eq. 10's scale; v2: blocks stored (d, rows). A float32-only package (``precision="fp32"``)
#: is still written as v3, byte for byte what earlier versions wrote, so older readers open it.
FORMAT_VERSION = 7
LEGACY_VERSION = 3
#: v5 adds the 4-bit block kind ("i4", precision "int4"); v6 the kinds whose item-row scale is
#: shared by all of an item's blocks ("i8s" / "i4s", precisions "int8s" / "int4s") and the
#: ``row_scale`` array that holds it; v7 the 4-bit refinement kind ("r4s", the ``int4r*``
#: precisions), a second 4-bit term of a block already kept as "i4s". Packages of every other
#: precision are still written as v6, v5, v4 (or v3), byte for byte what earlier versions wrote.
MIXED_VERSION = 4
INT4_VERSION = 5
SHARED_VERSION = 6
READABLE_VERSIONS = (LEGACY_VERSION, MIXED_VERSION, INT4_VERSION, SHARED_VERSION,
                     FORMAT_VERSION)
MAGIC = b"PEELPKG\x00"
#: magic, format version, JSON header length, payload length, budget in bytes, sha256 digest.
PREAMBLE = struct.Struct("<8sIIQQ32s")
PREAMBLE_BYTES = 64
#: Every array starts on a 64-byte boundary so the device can view it in place (np.frombuffer).
ALIGN = 64
SIMILARITIES = ("aligned", "literal")
#: "none": Eq. 10 as written (blocks unweighted); "alpha": each kept block scaled by its weight,
#: as the blocks were seen in training (a measured alternative, not the paper's deployment).
WEIGHTINGS = ("none", "alpha")
#: "eq10": Eq. 10's factor max_k |S_k| / |S_g| multiplies the scores of item group g (the
#: paper); "none": the plain sum over the kept blocks, a partial dot product (measured better
#: on validation: docs/paper-notes.md, Stage 2, "Eq. 10's factor").
SCALES = ("none", "eq10")
SELECTIONS = ("importance", "random")
#: How one kept block is stored (its code in a v4 package's ``kinds`` array is the index):
#: "f32" float32; "f16" IEEE float16; "i8" int8 codes with one float16 scale per item row
#: (x ~ scale * code); "i8o" int8 codes with a float16 scale and offset per item row
#: (x ~ offset + scale * code); "i4" 4-bit codes in [-7, 7] with one float16 scale per item
#: row, two codes a byte (byte j holds dims j and j + ceil(d/2)); "i8s" / "i4s" int8 / 4-bit
#: codes whose item-row scale is the package's ``row_scale`` (one float16 per item, shared by
#: all of the item's blocks) times a float32 scale per block dimension stored with the block
#: (x[i, j] ~ row_scale[i] * col_scale[j] * code); "r4s" a 4-bit refinement of a block kept
#: earlier in the selection as "i4s": codes of what the "i4s" codes left over, stored like
#: "i4s" with their own column scales and the same row scale, and added to the block's values
#: (so a block with its refinement holds about 8 bits a value). Every kind is stored
#: dimension-major, (d or ceil(d/2) rows, items in group).
BLOCK_KINDS = ("f32", "f16", "i8", "i8o", "i4", "i8s", "i4s", "r4s")
KIND_F32, KIND_F16, KIND_I8, KIND_I8O, KIND_I4, KIND_I8S, KIND_I4S, KIND_R4S = range(8)
#: The kinds whose row scale is the shared ``row_scale`` array.
SHARED_KINDS = (KIND_I8S, KIND_I4S, KIND_R4S)
#: The 4-bit kinds (two codes a byte).
NIBBLE_KINDS = (KIND_I4, KIND_I4S, KIND_R4S)
#: The kinds that add to a block already selected instead of being a block of their own.
REFINE_KINDS = (KIND_R4S,)


def kind_table(version: int) -> tuple[str, ...]:
    """The block kinds a package of format ``version`` names (v3 / v4: the first four; v5 adds
    "i4", v6 "i8s" and "i4s", v7 "r4s"; a v3 package holds float32 blocks only)."""
    return BLOCK_KINDS[: {FORMAT_VERSION: KIND_R4S + 1, SHARED_VERSION: KIND_R4S,
                          INT4_VERSION: KIND_I8S}.get(version, KIND_I4)]
#: Package precision rules (``peel.package`` resolves "auto" to the validated default):
#: "fp32" every block float32 (format v3); "fp16" / "int8" / "int8o" / "int4" / "int8s" /
#: "int4s" every block of that kind ("s": the item-row scale shared across blocks, format v6);
#: "value" per block the kind of highest importance-per-byte after its measured quantisation
#: error, blocks ordered by that value per byte; "int4rP" (format v7) every block as "i4s"
#: and, in the same order, a 4-bit refinement ("r4s") of each, a refinement ranked as if its
#: weight were P% of its block's (:data:`REFINE_DISCOUNTS`): int4r0 puts every refinement
#: after every block, int4r100 each refinement right after its block.
REFINE_DISCOUNTS = {"int4r0": 0.0, "int4r25": 0.25, "int4r50": 0.5, "int4r100": 1.0}
PRECISIONS = ("fp32", "fp16", "int8", "int8o", "int4", "int8s", "int4s", "value",
              *REFINE_DISCOUNTS)
#: The precisions whose blocks share one float16 scale per item (a ``row_scale`` array).
SHARED_PRECISIONS = ("int8s", "int4s", *REFINE_DISCOUNTS)
#: Each stored block starts on this many bytes, so float32 / float16 views stay aligned.
BLOCK_ALIGN = 4
MB = 1_000_000
MAX_INDEX = 0xFFFF  # item groups and blocks are stored as uint16 in the selection list

ACCEPTED_BUDGETS = (
    "an integer number of bytes (5000000), a size with a unit (512KB, 5MB, 1.5GB, 10MiB; "
    "KB/MB/GB are powers of 1000, KiB/MiB/GiB powers of 1024), or a fraction in (0, 1] of "
    "the full float32 item table (0.25 or 25%)"
)
_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30,
}
_BUDGET_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z%]*)", re.IGNORECASE)

#: The digest covers the preamble's first 32 bytes (all fields but itself) and the rest.
HASHED_PREAMBLE = 32
assert PREAMBLE.size == PREAMBLE_BYTES


#: Largest budget accepted: byte counts are int64 in numpy and a u64 in the package preamble,
#: so anything larger failed with struct.error / OverflowError instead of a message.
MAX_BUDGET_BYTES = 2**63 - 1


class BudgetError(PeelError):
    """A budget that cannot be met (or parsed); the message says what would work."""


# --------------------------------------------------------------------------- budget parsing


def full_table_bytes(n_items: int, dim: int) -> int:
    """Bytes of the full float32 item table: the reference for fractional budgets."""
    return int(n_items) * int(dim) * 4


def parse_budget(spec: str | int | float, full_table: int | None = None) -> int:
    """Turn a user-facing budget into bytes.

    Integers are bytes; floats are fractions of the full item table (``full_table`` bytes),
    because "keep 25% of the table" is how the paper's budgets relate to each other.
    """
    if isinstance(spec, bool) or not isinstance(spec, (str, int, float, np.integer,
                                                       np.floating)):
        raise BudgetError(f"budget {spec!r}: expected {ACCEPTED_BUDGETS}")
    if isinstance(spec, (int, np.integer)):
        return _positive_bytes(int(spec), str(spec))
    if isinstance(spec, (float, np.floating)):
        if not math.isfinite(spec):
            raise BudgetError(f"budget {spec!r}: expected {ACCEPTED_BUDGETS}")
        return _fraction_bytes(Fraction(float(spec)), full_table, str(spec))
    match = _BUDGET_RE.fullmatch(spec.strip())
    if match is None:
        raise BudgetError(f"budget {spec!r} not understood; write {ACCEPTED_BUDGETS}")
    number, unit = Fraction(match.group(1)), match.group(2).lower()
    if unit == "%":
        return _fraction_bytes(number / 100, full_table, spec)
    if unit == "":
        if "." in match.group(1):
            return _fraction_bytes(number, full_table, spec)
        return _positive_bytes(int(number), spec)
    if unit not in _UNITS:
        raise BudgetError(f"budget {spec!r}: unknown unit {match.group(2)!r}; write "
                          f"{ACCEPTED_BUDGETS}")
    return _positive_bytes(math.floor(number * _UNITS[unit]), spec)


def _positive_bytes(value: int, text: str) -> int:
    if value <= 0:
        raise BudgetError(f"budget {text!r} must be positive; write {ACCEPTED_BUDGETS}")
    if value > MAX_BUDGET_BYTES:
        raise BudgetError(f"budget {text!r} is {value:.3g} bytes, more than the largest "
                          f"supported ({MAX_BUDGET_BYTES:,} B); write a smaller budget")
    return value


def _fraction_bytes(fraction: Fraction, full_table: int | None, text: str) -> int:
    if not 0 < fraction <= 1:
        raise BudgetError(f"budget {text!r}: a fraction of the item table must be in (0, 1]; "
                          f"for an absolute size write bytes or a unit such as 5MB")
    if full_table is None:
        raise BudgetError(f"budget {text!r} is a fraction but the item table size is unknown "
                          f"here; give an absolute size such as 5MB")
    return _positive_bytes(math.floor(fraction * full_table), text)


def format_bytes(n: int) -> str:
    """Bytes exactly (budgets are compared to the byte) plus MB for humans."""
    return f"{n:,} B ({n / MB:.3f} MB)"


# --------------------------------------------------------------------------- block selection


def check_alpha(alpha: np.ndarray, where: str = "alpha") -> np.ndarray:
    """Validate importance weights: 2-D (item groups, blocks), finite and non-negative."""
    a = np.asarray(alpha)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{where}: expected shape (n_item_groups, n_blocks), got {a.shape}")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"{where}: expected real numbers, got dtype {a.dtype}")
    if a.shape[0] > MAX_INDEX or a.shape[1] > MAX_INDEX:
        raise ValueError(f"{where}: at most {MAX_INDEX} item groups and blocks are supported")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError(f"{where}: weights must be finite and non-negative")
    return a


def selection_order(alpha: np.ndarray, mode: str = "importance", seed: int = 0) -> np.ndarray:
    """All (item group, block) pairs in deployment order, as an int64 array of shape (G*N, 2).

    The first G rows hold one block per item group, so any budget that admits G blocks keeps
    every item rankable. ``importance`` (the paper): each group's highest-weight block first,
    then every other pair; both phases by weight descending. Ties are broken by lower item
    group, then lower block index, so the order never depends on sort stability.
    ``random`` (the "w/o Importance Weight" ablation): a uniformly random order of all pairs
    drawn from ``seed``, with each group's first block in that order moved to the front.
    """
    a = check_alpha(alpha)
    n_groups, n_blocks = a.shape
    if mode == "importance":
        flat = np.arange(n_groups * n_blocks)
        # lexsort keys: last is primary -> weight descending, then group, then block.
        order = np.lexsort((flat % n_blocks, flat // n_blocks, -a.ravel()))
    elif mode == "random":
        order = np.random.default_rng(_check_seed(seed)).permutation(n_groups * n_blocks)
    else:
        raise ValueError(f"selection mode {mode!r}: choose one of {', '.join(SELECTIONS)}")
    first = np.zeros(order.size, dtype=bool)
    first[np.unique(order // n_blocks, return_index=True)[1]] = True
    order = np.concatenate([order[first], order[~first]])
    return np.stack([order // n_blocks, order % n_blocks], axis=1).astype(np.int64)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed {seed!r}: expected a non-negative integer")
    return int(seed)


# --------------------------------------------------------------------------- accounting


@dataclass(frozen=True)
class PackageSpec:
    """Everything about a package that sets its size, apart from how many blocks it keeps."""

    n_items: int
    n_blocks: int
    block_dim: int
    group_counts: tuple[int, ...]
    similarity: str = "aligned"
    weighting: str = "none"
    selection: str = "importance"
    seed: int | None = None
    scale: str = "none"
    group: int | None = None
    user: int | None = None
    user_stored: bool = False
    n_seen: int = 0
    item_ids: bool = False
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity {self.similarity!r}: choose one of "
                             f"{', '.join(SIMILARITIES)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting {self.weighting!r}: choose one of "
                             f"{', '.join(WEIGHTINGS)}")
        if self.scale not in SCALES:
            raise ValueError(f"scale {self.scale!r}: choose one of {', '.join(SCALES)}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection {self.selection!r}: choose one of "
                             f"{', '.join(SELECTIONS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: choose one of "
                             f"{', '.join(PRECISIONS)}")
        if sum(self.group_counts) != self.n_items:
            raise ValueError("group_counts must add up to n_items")

    @property
    def dim(self) -> int:
        return self.n_blocks * self.block_dim

    @property
    def n_groups(self) -> int:
        return len(self.group_counts)

    @property
    def label_dtype(self) -> str:
        return "|u1" if self.n_groups <= 256 else "<u2"

    @property
    def version(self) -> int:
        """The format version this package is written in: v3 when every block is float32, v5
        when blocks are 4-bit (the only kind v4 readers do not know), v6 when item rows share
        one scale, v7 when blocks may be refined, v4 otherwise."""
        if self.precision == "fp32":
            return LEGACY_VERSION
        if self.refined:
            return FORMAT_VERSION
        if self.precision in SHARED_PRECISIONS:
            return SHARED_VERSION
        return INT4_VERSION if self.precision == "int4" else MIXED_VERSION

    @property
    def block_kinds(self) -> tuple[str, ...]:
        """The kinds this package's ``kinds`` codes may name (its header's table)."""
        return kind_table(self.version)

    @property
    def mixed(self) -> bool:
        """Whether blocks may be stored at other precisions than float32 (format v4)."""
        return self.version >= 4

    @property
    def refined(self) -> bool:
        """Whether blocks may be kept a second time as a refinement ("r4s", format v7)."""
        return self.precision in REFINE_DISCOUNTS

    @property
    def n_pairs(self) -> int:
        """Entries of the full selection order: every (item group, block) pair, twice when
        each may also be refined."""
        return self.n_groups * self.n_blocks * (2 if self.refined else 1)

    @property
    def shared_scale(self) -> bool:
        """Whether the package holds one float16 scale per item (``row_scale``, format v6)."""
        return self.precision in SHARED_PRECISIONS


@dataclass(frozen=True)
class BudgetReport:
    """Bytes per part of a package. ``total`` is what counts against the budget.

    ``user_embedding`` is always D float32: a package built for a whole user group leaves the
    embedding to the device, which still has to store it. ``item_index`` is the item-group
    offsets and one label per item (the row order); ``selection`` the kept (group, block)
    pairs and their weights; ``header`` the 64-byte preamble and the JSON; ``padding`` the
    64-byte alignment that lets the device use the arrays in place.
    """

    budget: int
    n_selected: int
    n_candidates: int
    item_blocks: int
    user_embedding: int
    item_index: int
    selection: int
    item_ids: int
    seen: int
    header: int
    padding: int
    user_stored: bool
    file_bytes: int

    @property
    def total(self) -> int:
        return (self.item_blocks + self.user_embedding + self.item_index + self.selection
                + self.item_ids + self.seen + self.header + self.padding)

    @property
    def overhead(self) -> int:
        """Everything but item blocks and the user embedding: the price of the format."""
        return self.total - self.item_blocks - self.user_embedding

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "overhead": self.overhead}

    def table(self) -> str:
        """A human-readable breakdown, one part per line."""
        parts = ["item_blocks", "user_embedding", "item_index", "selection", "item_ids", "seen",
                 "header", "padding"]
        lines = [f"  {name:<15}{getattr(self, name):>14,} B" for name in parts]
        note = "" if self.user_stored else " (user embedding reserved, stored on the device)"
        lines.append(f"  {'total':<15}{self.total:>14,} B of {self.budget:,} B budget{note}")
        lines.append(f"  blocks kept: {self.n_selected} of {self.n_candidates}; file "
                     f"{self.file_bytes:,} B")
        return "\n".join(lines)


@dataclass(frozen=True)
class ArraySlot:
    """One array in the payload; ``offset`` is relative to the payload start."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Layout:
    """The exact byte layout of one package file."""

    spec: PackageSpec
    budget: int
    n_selected: int
    header: bytes
    slots: tuple[ArraySlot, ...]
    report: BudgetReport

    @property
    def data_start(self) -> int:
        return PREAMBLE_BYTES + _pad(len(self.header))

    @property
    def payload_bytes(self) -> int:
        last = self.slots[-1]
        return last.offset + last.nbytes

    @property
    def file_bytes(self) -> int:
        return self.data_start + self.payload_bytes

    def slot(self, name: str) -> ArraySlot | None:
        return next((s for s in self.slots if s.name == name), None)


def _pad(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _slots(spec: PackageSpec, n_selected: int, block_size: int) -> tuple[ArraySlot, ...]:
    wanted: list[tuple[str, str, tuple[int, ...]]] = [
        ("group_offsets", "<i8", (spec.n_groups + 1,)),
        ("item_group", spec.label_dtype, (spec.n_items,)),
    ]
    if spec.item_ids:
        wanted.append(("item_ids", "<i8", (spec.n_items,)))
    if spec.user_stored:
        wanted.append(("user_emb", "<f4", (spec.dim,)))
    if spec.n_seen:
        wanted.append(("seen", "<i4", (spec.n_seen,)))
    wanted.append(("selection", "<u2", (n_selected, 2)))
    wanted.append(("weights", "<f4", (n_selected,)))  # alpha of each kept block
    if spec.mixed:
        wanted.append(("kinds", "|u1", (n_selected,)))  # BLOCK_KINDS code of each kept block
        if spec.shared_scale:  # one float16 per item, in stored row order, shared by its blocks
            wanted.append(("row_scale", "<f2", (spec.n_items,)))
        blocks = ("blocks", "|u1", (block_size,))  # bytes: the kinds differ in item size
    else:
        blocks = ("blocks", "<f4", (block_size * spec.block_dim,))
    # The block payload goes last so that a smaller package is a byte prefix of a larger one.
    wanted.append(blocks)
    slots, offset = [], 0
    for name, dtype, shape in wanted:
        slot = ArraySlot(name, dtype, shape, _pad(offset))
        slots.append(slot)
        offset = slot.offset + slot.nbytes
    return tuple(slots)


def header_document(spec: PackageSpec, n_selected: int,
                    slots: tuple[ArraySlot, ...]) -> dict[str, Any]:
    """The JSON header: self-description for any reader, and the array table for ours.

    A v4 header adds the precision rule and the table of block kinds (the meaning of the
    ``kinds`` codes); a float32 package's header is the v3 one, key for key.
    """
    doc = {
        "format": FORMAT_NAME,
        "version": spec.version,
        "n_items": spec.n_items,
        "n_blocks": spec.n_blocks,
        "block_dim": spec.block_dim,
        "n_item_groups": spec.n_groups,
        "similarity": spec.similarity,
        "weighting": spec.weighting,
        "scale": spec.scale,
        "selection": spec.selection,
        "seed": spec.seed,
        "group": spec.group,
        "user": spec.user,
        "n_selected": n_selected,
        "arrays": {s.name: {"dtype": s.dtype, "shape": list(s.shape), "offset": s.offset}
                   for s in slots},
    }
    if spec.mixed:
        doc["precision"] = spec.precision
        doc["block_kinds"] = list(spec.block_kinds)
    return doc


def encode_header(doc: dict[str, Any]) -> bytes:
    """Deterministic compact JSON, so equal packages are equal byte for byte."""
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode("ascii")


def layout(spec: PackageSpec, n_selected: int, block_size: int, budget: int) -> Layout:
    """The layout and accounting of ``spec`` keeping ``n_selected`` blocks.

    ``block_size`` is what the kept blocks take (:func:`prefix_sizes`): for a float32 (v3)
    package the number of (item, block) pairs kept, i.e. the sum over the selected (group,
    block) pairs of the group's item count; for a mixed-precision (v4) package their bytes,
    scales, offsets and per-block alignment included. The budget is kept in the binary
    preamble, not in the JSON, so the header's size (and so the selection) cannot depend on the
    budget's digits; this is what makes a shrunk package identical to one built at the smaller
    budget.
    """
    slots = _slots(spec, n_selected, block_size)
    header = encode_header(header_document(spec, n_selected, slots))
    sizes = {s.name: s.nbytes for s in slots}
    reserved_user = 0 if spec.user_stored else spec.dim * 4
    payload = slots[-1].offset + slots[-1].nbytes
    file_bytes = PREAMBLE_BYTES + _pad(len(header)) + payload
    report = BudgetReport(
        budget=int(budget),
        n_selected=n_selected,
        n_candidates=spec.n_pairs,
        item_blocks=sizes["blocks"] + sizes.get("row_scale", 0),
        user_embedding=sizes.get("user_emb", reserved_user),
        item_index=sizes["group_offsets"] + sizes["item_group"],
        selection=sizes["selection"] + sizes["weights"] + sizes.get("kinds", 0),
        item_ids=sizes.get("item_ids", 0),
        seen=sizes.get("seen", 0),
        header=PREAMBLE_BYTES + len(header),
        padding=file_bytes - PREAMBLE_BYTES - len(header) - sum(sizes.values()),
        user_stored=spec.user_stored,
        file_bytes=file_bytes,
    )
    return Layout(spec, int(budget), n_selected, header, slots, report)


def row_bytes(kind: int, block_dim: int) -> int:
    """Bytes one item takes in a block of ``kind``: its d values, plus its scale and offset
    (the shared kinds' row scale is the package's ``row_scale``, paid once per item)."""
    return (4 * block_dim, 2 * block_dim, block_dim + 2, block_dim + 4,
            (block_dim + 1) // 2 + 2, block_dim, (block_dim + 1) // 2,
            (block_dim + 1) // 2)[kind]


def block_extra(kind: int, block_dim: int) -> int:
    """Bytes a stored block of ``kind`` takes whatever its rows: the shared kinds' float32
    scale per dimension."""
    return 4 * block_dim if kind in SHARED_KINDS else 0


def block_bytes(kind: int, block_dim: int, items: int) -> int:
    """Bytes of one stored block of ``items`` rows, padded to :data:`BLOCK_ALIGN`."""
    raw = block_extra(kind, block_dim) + items * row_bytes(kind, block_dim)
    return -(-raw // BLOCK_ALIGN) * BLOCK_ALIGN


def prefix_rows(spec: PackageSpec, order: np.ndarray) -> np.ndarray:
    """Cumulative (item, block) rows of each prefix of ``order``; entry k is for k blocks."""
    counts = np.asarray(spec.group_counts, dtype=np.int64)
    groups = np.asarray(order)[:, 0].astype(np.int64)
    return np.concatenate([[0], np.cumsum(counts[groups])])


def prefix_sizes(spec: PackageSpec, order: np.ndarray,
                 kinds: np.ndarray | None = None) -> np.ndarray:
    """Entry k: the ``block_size`` of :func:`layout` for the first k pairs of ``order``.

    Rows for a float32 (v3) package (``kinds`` unused), bytes for a mixed one, where
    ``kinds`` (one :data:`BLOCK_KINDS` code per pair of ``order``) is required.
    """
    if not spec.mixed:
        return prefix_rows(spec, order)
    if kinds is None or len(kinds) != len(order):
        raise ValueError("a mixed-precision package needs one block kind per selected pair")
    counts = np.asarray(spec.group_counts, dtype=np.int64)
    k = np.asarray(kinds, dtype=np.int64)
    known = len(spec.block_kinds)
    if k.size and (k.min() < 0 or k.max() >= known):
        raise ValueError(f"block kinds must be codes in [0, {known}) in a v{spec.version} "
                         "package")
    per_row = np.array([row_bytes(x, spec.block_dim) for x in range(len(BLOCK_KINDS))])
    extra = np.array([block_extra(x, spec.block_dim) for x in range(len(BLOCK_KINDS))])
    raw = counts[np.asarray(order)[:, 0].astype(np.int64)] * per_row[k] + extra[k]
    padded = -(-raw // BLOCK_ALIGN) * BLOCK_ALIGN
    return np.concatenate([[0], np.cumsum(padded)]).astype(np.int64)


def minimum_budget(spec: PackageSpec, order: np.ndarray,
                   kinds: np.ndarray | None = None) -> int:
    """The smallest budget that keeps one block per item group (plus user and index)."""
    sizes = prefix_sizes(spec, order[: spec.n_groups],
                         None if kinds is None else kinds[: spec.n_groups])
    return layout(spec, spec.n_groups, int(sizes[spec.n_groups]), 0).report.total


def fit(spec: PackageSpec, order: np.ndarray, budget: int,
        rows: np.ndarray | None = None, kinds: np.ndarray | None = None) -> Layout:
    """The layout keeping the longest prefix of ``order`` whose total fits ``budget``.

    Stops at the first pair that does not fit rather than skipping to smaller ones: skipping
    would break the prefix property that instant shrink relies on, and costs at most one
    block's bytes. The cost is monotone in the prefix length, so a binary search is exact.
    ``order`` may itself be a prefix of the full order (a package re-fitting on the device).
    ``rows``: :func:`prefix_sizes` of ``order`` when already known; ``kinds``: each pair's
    block kind (mixed-precision packages).
    """
    if len(order) < spec.n_groups:
        raise ValueError("the selection order must start with one block per item group")
    rows = prefix_sizes(spec, order, kinds) if rows is None else rows
    lo = spec.n_groups
    best = layout(spec, lo, int(rows[lo]), budget)
    if best.report.total > budget:
        raise BudgetError(minimum_message(budget, best.report, spec))
    hi = len(order)
    lo, hi, best = _bracket(spec, rows, budget, lo, hi, best)
    while lo < hi:  # invariant: prefix lo fits; the answer is in [lo, hi]
        mid = (lo + hi + 1) // 2
        candidate = layout(spec, mid, int(rows[mid]), budget)
        if candidate.report.total <= budget:
            lo, best = mid, candidate
        else:
            hi = mid - 1
    return best


#: Bound on how far a package's total can stray from its payload arithmetic: the header's
#: digits and the 64-byte alignment of each array (a dozen arrays at most).
_LAYOUT_SLACK = 2048


def _bracket(spec: PackageSpec, rows: np.ndarray, budget: int, lo: int, hi: int,
             best: Layout) -> tuple[int, int, Layout]:
    """Narrow [lo, hi] for :func:`fit` without building layouts: the total of a prefix is
    the minimum's plus the added block bytes and per-block list entries, give or take
    :data:`_LAYOUT_SLACK`. A device shrink then builds two or three layouts, not log2(G*N)
    (each one encodes the JSON header). The narrowed bounds are checked, never trusted."""
    unit = 1 if spec.mixed else 4 * spec.block_dim  # payload bytes per unit of ``rows``
    per_block = 2 * 2 + 4 + (1 if spec.mixed else 0)  # selection, weight, kind
    k = np.arange(len(rows), dtype=np.int64)
    estimate = (best.report.total + (np.asarray(rows, np.int64) - int(rows[lo])) * unit
                + (k - lo) * per_block)
    top = int(np.searchsorted(estimate, budget + _LAYOUT_SLACK, side="right")) - 1
    sure = int(np.searchsorted(estimate, budget - _LAYOUT_SLACK, side="right")) - 1
    if lo < top < hi:
        over = layout(spec, top + 1, int(rows[top + 1]), budget)
        if over.report.total > budget:  # as the bound says: nothing beyond top fits
            hi = top
    sure = min(sure, hi)
    if sure > lo:
        fits = layout(spec, sure, int(rows[sure]), budget)
        if fits.report.total <= budget:
            lo, best = sure, fits
    return lo, hi, best


def minimum_message(budget: int, minimum: BudgetReport, spec: PackageSpec) -> str:
    """Why a budget is refused, with the number that would work."""
    return (f"budget {format_bytes(budget)} is below the minimum {format_bytes(minimum.total)} "
            f"for this package: one block per item group ({spec.n_groups} groups, "
            f"{minimum.item_blocks:,} B) + user embedding ({minimum.user_embedding:,} B) + "
            f"index and header ({minimum.overhead:,} B); use a budget of {minimum.total} bytes "
            "or more")
