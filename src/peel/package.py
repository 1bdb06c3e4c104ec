"""Server side: turn one user group's trained arrays into a package for a memory budget.

Input contract (per user group, produced upstream): ``blocks`` float32 (n_items, N, d) in
deployed form, ``alpha`` (G_v, N) non-negative block weights per item group, ``item_group``
(n_items,) in [0, G_v), ``users`` (n_g,) and ``user_emb`` (n_g, D). A run folder holds them as
``RUN/groups/group_{g:03d}.npz``.

The package format (see ``peel.budget`` for the byte-exact layout and ``peel.device`` for the
reader): a 64-byte binary preamble (magic, format version, header length, payload length,
budget, sha256), a JSON header padded to 64 bytes, then little-endian arrays each starting on a
64-byte boundary: ``group_offsets``, ``item_group``, optional ``item_ids``, ``user_emb`` and
``seen``, the ``selection`` list of (item group, block) pairs and their ``weights`` (alpha),
and last the ``blocks`` payload: for every selected pair in selection order, the block of
that group's items stored dimension-major, (d, items in group). Dimension-major because Eq. 10
then is a d x rows vector-matrix product that streams the bytes at memory speed; the row-major
(rows, d) layout of format v1 made BLAS do one 8-element dot per row, about 4x slower.
Items are stored grouped (stable sort by item group), so each selected pair is one contiguous
array and a smaller budget's package is a byte prefix of a larger one's payload. The row order
is not stored as a permutation: ``item_group`` (one byte per item in item-index order) defines
it, and the device derives the permutation once (4x smaller than int32 indices, which at
91,599 items is 275 KB more budget for blocks).

Mixed precision (format v4, issue 20): a ``kinds`` array after ``weights`` says how each kept
block is stored (``peel.budget.BLOCK_KINDS``: float32, float16, or int8 with a float16 scale,
and optionally offset, per item row; ``peel.quantize``), and the payload is then bytes, each
block padded to 4. Which kind each (item group, block) pair gets, and the order, come from a
precision rule (:func:`precision_order`) that does not depend on the budget, so the prefix
property holds. ``precision="fp32"`` writes the v3 file of earlier versions byte for byte.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from peel.budget import (
    BLOCK_KINDS,
    KIND_F16,
    KIND_F32,
    KIND_I4,
    KIND_I4S,
    KIND_I8,
    KIND_I8O,
    KIND_I8S,
    KIND_R4S,
    PRECISIONS,
    REFINE_DISCOUNTS,
    SHARED_KINDS,
    BudgetReport,
    Layout,
    PackageSpec,
    check_alpha,
    fit,
    full_table_bytes,
    parse_budget,
    row_bytes,
    selection_order,
)
from peel.device import write_package
from peel.quantize import PrecisionError, encode, row_scales

#: How item blocks meet the user vector in Eq. 10 ("aligned" or "literal", see peel.device).
#: Stored in every package; chosen by measurement, so change it here only.
DEFAULT_SIMILARITY = "aligned"
#: Whether kept blocks are scaled by their importance weight when scoring ("none": Eq. 10 as
#: the paper writes it; "alpha": as the blocks entered training). Stored in every package.
#: "none" by measurement: on ml-1m alpha weighting costs up to 0.06 validation Recall@20 with
#: the default training (on the demo data it gained 0.02 at 10.7%); docs/paper-notes.md.
DEFAULT_WEIGHTING = "none"
#: Whether Eq. 10's factor max_k |S_k| / |S_g| multiplies each item group's scores ("eq10", the
#: paper) or not ("none"). "none" by measurement: deployed validation Recall@20 at 10.7/21.3/53.3%
#: of the table is 0.137/0.166/0.186 without the factor vs 0.024/0.020/0.054 with it on gowalla,
#: 0.174/0.193/0.199 vs 0.133/0.157/0.194 on ml-1m (docs/paper-notes.md, Stage 2,
#: "Eq. 10's factor").
DEFAULT_SCALE = "none"
#: The precision rule ``precision="auto"`` (the default) stands for where a run has not chosen
#: its own on validation (``peel.autoprecision``; it is also the first candidate there); see
#: :data:`PRECISIONS` and
#: docs/paper-notes.md, "Mixed precision", "Shared row scales" and "4-bit refinements": chosen
#: on validation Recall@20 of two datasets, three seeds each, every dataset counting equally
#: (docs/results/precision/auto_valid_refine.md: int4r25 0.2227, int4r0 and int4r50 0.2222,
#: int8s 0.2212; int8s was the default before, int8 before shared scales, fp16 before that).
DEFAULT_PRECISION = "int4r25"
#: What ``--precision`` / ``precision=`` accept: "auto" or one of the rules.
PRECISION_CHOICES = ("auto", *PRECISIONS)
_RULE_KIND = {"fp32": KIND_F32, "fp16": KIND_F16, "int8": KIND_I8, "int8o": KIND_I8O,
              "int4": KIND_I4, "int8s": KIND_I8S, "int4s": KIND_I4S}
#: The kinds the "value" rule chooses among: those of format v4, so its packages stay v4.
_VALUE_KINDS = KIND_I4


def resolve_precision(precision: str | None) -> str:
    """The rule a package is built with: ``None`` and "auto" mean :data:`DEFAULT_PRECISION`."""
    if precision is None or precision == "auto":
        return DEFAULT_PRECISION
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of "
                         f"{', '.join(PRECISION_CHOICES)}")
    return precision


@dataclass(frozen=True)
class GroupArrays:
    """One user group's validated arrays (the upstream contract)."""

    blocks: np.ndarray
    alpha: np.ndarray
    item_group: np.ndarray
    users: np.ndarray
    user_emb: np.ndarray
    source: str = "<arrays>"

    @property
    def n_items(self) -> int:
        return int(self.blocks.shape[0])

    @property
    def dim(self) -> int:
        return int(self.blocks.shape[1] * self.blocks.shape[2])

    def user_row(self, user: int) -> int:
        """Row of ``user`` in this group's ``users``/``user_emb``."""
        hits = np.flatnonzero(self.users == user)
        if hits.size == 0:
            raise ValueError(f"{self.source}: user {user} is not in this user group")
        return int(hits[0])


def check_group_arrays(blocks: np.ndarray, alpha: np.ndarray, item_group: np.ndarray,
                       users: np.ndarray | None = None, user_emb: np.ndarray | None = None,
                       source: str = "<arrays>") -> GroupArrays:
    """Validate the upstream arrays once, at the boundary, naming the file and the problem."""
    b = np.asarray(blocks)
    if b.ndim != 3 or min(b.shape) < 1 or not np.issubdtype(b.dtype, np.floating):
        raise ValueError(f"{source}: blocks must be a float array (n_items, N, d) with every "
                         f"dimension >= 1, got {b.dtype} {b.shape}")
    b = np.ascontiguousarray(b, dtype=np.float32)
    if not np.all(np.isfinite(b)):
        raise ValueError(f"{source}: blocks contain NaN or infinite values; check training")
    a = check_alpha(alpha, f"{source}: alpha")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{source}: alpha has {a.shape[1]} blocks per item group but blocks "
                         f"has N={b.shape[1]}")
    g = np.asarray(item_group)
    if g.shape != (b.shape[0],) or not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"{source}: item_group must be {b.shape[0]} integers (one per item), "
                         f"got {g.dtype} {g.shape}")
    if g.size and (g.min() < 0 or g.max() >= a.shape[0]):
        raise ValueError(f"{source}: item_group values must be in [0, {a.shape[0]}) (alpha has "
                         f"{a.shape[0]} item groups)")
    dim = b.shape[1] * b.shape[2]
    u = np.zeros(0, dtype=np.int64) if users is None else np.asarray(users)
    e = np.zeros((0, dim), dtype=np.float32) if user_emb is None else np.asarray(user_emb)
    if u.ndim != 1 or (u.size and not np.issubdtype(u.dtype, np.integer)):
        raise ValueError(f"{source}: users must be a 1-D integer array")
    if e.shape != (u.size, dim) or not (e.size == 0 or np.issubdtype(e.dtype, np.floating)):
        raise ValueError(f"{source}: user_emb must be float ({u.size}, {dim}) to match users "
                         f"and blocks, got {e.dtype} {e.shape}")
    e = np.ascontiguousarray(e, dtype=np.float32)
    if not np.all(np.isfinite(e)):
        raise ValueError(f"{source}: user_emb contains NaN or infinite values")
    return GroupArrays(b, a, g.astype(np.int64), u.astype(np.int64), e, source)


def synthetic_group(n_items: int = 1000, n_blocks: int = 16, block_dim: int = 8,
                    n_item_groups: int = 20, n_users: int = 8, seed: int = 0) -> GroupArrays:
    """Random arrays of the upstream contract, for tests, benchmarks and demos only.

    Items get equal-sized item groups in shuffled item order (so the stored permutation is not
    the identity), blocks are tanh of Gaussians like deployed blocks, alpha is a Dirichlet draw.
    """
    rng = np.random.default_rng(seed)
    blocks = np.tanh(rng.standard_normal((n_items, n_blocks, block_dim), dtype=np.float32))
    groups = rng.permutation(np.arange(n_items) * n_item_groups // n_items)
    alpha = rng.dirichlet(np.ones(n_item_groups * n_blocks)).reshape(n_item_groups, n_blocks)
    users = np.arange(n_users, dtype=np.int64)
    user_emb = rng.standard_normal((n_users, n_blocks * block_dim), dtype=np.float32)
    return check_group_arrays(blocks, alpha, groups, users, user_emb, source="synthetic")


# --------------------------------------------------------------------------- run folders

#: Run-folder readers moved to :mod:`peel.runfolder`, the one owner of the run layout; these
#: names stay importable from here for existing callers.
_RUNFOLDER_NAMES = ("group_files", "load_group", "find_user_group", "group_path")


def __getattr__(name: str) -> object:
    if name in _RUNFOLDER_NAMES:
        from peel import runfolder

        if name == "group_path":
            return lambda run, group: runfolder.group_paths(run, group)[0]
        return getattr(runfolder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- building


@dataclass(frozen=True)
class DeployOptions:
    """How a package is built, apart from the budget and whose it is.

    ``similarity`` / ``weighting`` / ``scale`` of ``None`` take :data:`DEFAULT_SIMILARITY` /
    :data:`DEFAULT_WEIGHTING` / :data:`DEFAULT_SCALE` when the package is built (so changing the
    constants is enough); ``precision`` of ``None`` or "auto" takes :data:`DEFAULT_PRECISION`.
    ``seed`` only matters to ``selection="random"`` and is recorded only then.
    """

    similarity: str | None = None
    weighting: str | None = None
    scale: str | None = None
    selection: str = "importance"
    seed: int = 0
    precision: str | None = None


@dataclass(frozen=True)
class _Plan:
    layout: Layout
    order: np.ndarray  # the kept (group, block) pairs, in selection order
    kinds: np.ndarray  # the BLOCK_KINDS code of each kept pair
    rows: np.ndarray  # item indices in stored order (grouped)
    offsets: np.ndarray


def kept_pairs(alpha: np.ndarray, item_group: np.ndarray, block_dim: int,
               budget: int | float | str, options: DeployOptions | None = None,
               group: int | None = None) -> np.ndarray:
    """The (item group, block) pairs that a group package for ``budget`` keeps, in order.

    Exactly the device's byte-exact selection (header, index and user vector included), so
    training and early stopping can score the blocks a device would really get. Only the
    precision rules that do not look at block values work here (not "value"). A block kept
    with its refinement (``int4r*``) is listed once.
    """
    rule = resolve_precision((options or DeployOptions()).precision)
    if rule == "value":
        raise ValueError("precision 'value' measures the blocks' quantisation error; "
                         "kept_pairs knows only their shape, choose another precision")
    n_items = len(item_group)
    shape = (n_items, alpha.shape[1], block_dim)  # only the shape matters: a zero-stride view
    arrays = GroupArrays(np.broadcast_to(np.float32(0), shape),
                         np.asarray(alpha, np.float64), np.asarray(item_group, np.int64),
                         np.zeros(0, np.int64), np.zeros((0, alpha.shape[1] * block_dim)))
    order = _plan(arrays, budget, None, group, options or DeployOptions(), None, None).order
    if len(order) == 0:
        return order
    _, first = np.unique(order[:, 0] * alpha.shape[1] + order[:, 1], return_index=True)
    return order[np.sort(first)]  # a refined block is still one block


def _plan(arrays: GroupArrays, budget: int | float | str, user: int | None,
          group: int | None, options: DeployOptions, item_ids: np.ndarray | None,
          seen: np.ndarray | None) -> _Plan:
    n_groups, n_blocks = arrays.alpha.shape
    counts = np.bincount(arrays.item_group, minlength=n_groups)
    nbytes = parse_budget(budget, full_table_bytes(arrays.n_items, arrays.dim))
    random = options.selection == "random"
    rule = resolve_precision(options.precision)
    spec = PackageSpec(
        n_items=arrays.n_items, n_blocks=n_blocks, block_dim=int(arrays.blocks.shape[2]),
        group_counts=tuple(int(c) for c in counts),
        similarity=options.similarity or DEFAULT_SIMILARITY,
        weighting=options.weighting or DEFAULT_WEIGHTING,
        scale=options.scale or DEFAULT_SCALE,
        selection=options.selection, seed=int(options.seed) if random else None,
        group=group, user=user, user_stored=user is not None,
        n_seen=0 if seen is None else int(seen.size), item_ids=item_ids is not None,
        precision=rule)
    order, kinds = precision_order(arrays, rule, spec.similarity, options.selection,
                                   options.seed)
    lay = fit(spec, order, nbytes, kinds=kinds)
    rows = np.argsort(arrays.item_group, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    k = lay.n_selected
    return _Plan(lay, order[:k], kinds[:k], rows, offsets)


def precision_order(arrays: GroupArrays, rule: str, similarity: str = DEFAULT_SIMILARITY,
                    selection: str = "importance",
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Every (item group, block) pair in deployment order, and the kind each is stored as.

    One order for every budget, each pair once at one kind, so a smaller budget's package is
    still a prefix of a larger one's. The fixed rules store every block at their kind in the
    paper's importance order. "value" stores each pair at the kind of highest value per byte,
    value = alpha * (1 - measured quantisation error) (:func:`quantisation_errors`), and
    orders the pairs by that value per byte (each item group's best pair first, as
    :func:`peel.budget.selection_order` does for alpha); ``selection="random"`` keeps its
    random order. The refinement rules (:func:`refined_order`) list every pair twice.
    """
    if rule in REFINE_DISCOUNTS:
        return refined_order(arrays.alpha, REFINE_DISCOUNTS[rule], selection, seed)
    if rule in _RULE_KIND:
        order = selection_order(arrays.alpha, selection, seed)
        return order, np.full(len(order), _RULE_KIND[rule], dtype=np.int64)
    if rule != "value":
        raise ValueError(f"precision {rule!r}: choose one of {', '.join(PRECISION_CHOICES)}")
    n_groups = arrays.alpha.shape[0]
    counts = np.maximum(np.bincount(arrays.item_group, minlength=n_groups), 1)
    d = int(arrays.blocks.shape[2])
    per_row = np.array([row_bytes(k, d) for k in range(_VALUE_KINDS)], dtype=np.float64)
    errors = quantisation_errors(arrays, similarity, n_kinds=_VALUE_KINDS)
    value = arrays.alpha[:, :, None] * np.clip(1 - errors, 0, None)
    per_byte = value / (counts[:, None, None] * per_row[None, None, :])
    score = per_byte.max(axis=2)
    # ties (e.g. a pair of no value at all) go to the kind of fewest bytes
    best = np.argmin(np.where(per_byte == score[:, :, None], per_row, np.inf), axis=2)
    order = selection_order(score if selection == "importance" else arrays.alpha, selection,
                            seed)
    return order, best[order[:, 0], order[:, 1]].astype(np.int64)


def refined_order(alpha: np.ndarray, discount: float, selection: str = "importance",
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ``int4r*`` order: every pair as an ``i4s`` block and again as its ``r4s`` refinement.

    The blocks keep the order of :func:`peel.budget.selection_order` (each item group's first
    block in front). A refinement enters the rest of the order as if its weight were
    ``discount`` times its block's, after every block of equal weight, refinements of equal
    weight by their block's weight, so with a discount <= 1 it always follows its own block.
    ``selection="random"``: the blocks in their random order, then the refinements in the same
    order (the discount needs weights).
    """
    blocks = selection_order(alpha, selection, seed)
    a = np.asarray(alpha, dtype=np.float64)
    n = len(blocks)
    weight = a[blocks[:, 0], blocks[:, 1]]
    if selection != "importance":
        key = np.concatenate([np.arange(n), n + np.arange(n)])
        tier = np.zeros(2 * n)
    else:
        key = -np.concatenate([weight, discount * weight])
        key[: a.shape[0]] = -np.inf  # each item group's first block stays in front
        tier = np.concatenate([np.zeros(n), np.ones(n)])
    # lexsort: last key primary -> weight key, then block before refinement, then position.
    position = np.concatenate([np.arange(n), np.arange(n)])
    order = np.lexsort((position, tier, key))
    kinds = np.where(order < n, KIND_I4S, KIND_R4S).astype(np.int64)
    return np.concatenate([blocks, blocks])[order], kinds


def quantisation_errors(arrays: GroupArrays, similarity: str = DEFAULT_SIMILARITY,
                        n_kinds: int = len(BLOCK_KINDS)) -> np.ndarray:
    """(G_v, N, kinds): relative error each storage kind puts on each pair's scores.

    For pair (g, n) at kind k: ||U (E - Q_k(E))^T||_F / ||U E^T||_F over the group's users U
    (their chunk n, or the sum of their chunks for the "literal" similarity) and the pair's
    item rows E, i.e. how much of the block's contribution to this group's scores the
    rounding changes. Computed through each block's d x d user Gram matrix, so it costs one
    pass over the table per kind. A kind that cannot hold a block (beyond float16's range)
    gets error 1 (no value). Without users the Gram matrix is the identity. ``n_kinds``: only
    the first kinds of :data:`BLOCK_KINDS` (the "value" rule needs no 4-bit encoding pass).
    A refinement's error is that of its block stored with it (``i4s`` plus ``r4s``).
    """
    n_groups, n_blocks = arrays.alpha.shape
    d = int(arrays.blocks.shape[2])
    users = arrays.user_emb.astype(np.float64).reshape(-1, n_blocks, d)
    if users.shape[0] == 0:
        grams = np.broadcast_to(np.eye(d), (n_blocks, d, d))
    elif similarity == "literal":
        total = users.sum(axis=1)
        grams = np.broadcast_to(total.T @ total, (n_blocks, d, d))
    else:
        grams = np.einsum("und,une->nde", users, users)
    errors = np.zeros((n_groups, n_blocks, n_kinds))
    for g in range(n_groups):
        items = np.flatnonzero(arrays.item_group == g)
        if items.size == 0:
            continue
        shared = None
        if n_kinds > min(SHARED_KINDS):
            try:
                shared = row_scales(arrays.blocks[items])
            except PrecisionError:
                errors[g, :, list(SHARED_KINDS)] = 1.0
        for n in range(n_blocks):
            rows = arrays.blocks[items, n, :].astype(np.float64)
            energy = np.einsum("jd,de,je->", rows, grams[n], rows)
            for kind in range(1, n_kinds):
                if kind in SHARED_KINDS and shared is None:
                    continue
                try:
                    delta = rows - encode(rows, kind, row_scale=shared).decoded
                    if kind == KIND_R4S:  # the refinement is added to the i4s values
                        delta -= encode(rows, KIND_I4S, row_scale=shared).decoded
                except PrecisionError:
                    errors[g, n, kind] = 1.0
                    continue
                loss = np.einsum("jd,de,je->", delta, grams[n], delta)
                errors[g, n, kind] = (np.sqrt(loss / energy) if energy > 0
                                      else float(loss > 0))
    return errors


def shared_row_scales(arrays: GroupArrays, rows: np.ndarray,
                      offsets: np.ndarray) -> np.ndarray:
    """The ``row_scale`` array of a shared-scale package: :func:`peel.quantize.row_scales` of
    each item group's items over all their blocks, in stored row order (``rows``)."""
    out = np.zeros(arrays.n_items, dtype="<f2")
    for g in range(len(offsets) - 1):
        lo, hi = int(offsets[g]), int(offsets[g + 1])
        if hi > lo:
            out[lo:hi] = row_scales(arrays.blocks[rows[lo:hi]],
                                    f"{arrays.source}: item group {g}")
    return out


def _block_parts(arrays: GroupArrays, plan: _Plan,
                 shared: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """The payload in selection order, one dimension-major (d, items in group) block at a time.

    A float32 package yields the float32 blocks; a mixed one each block's stored bytes.
    ``shared``: the package's ``row_scale`` (shared-scale kinds).
    """
    mixed = plan.layout.spec.mixed
    for (g, n), kind in zip(plan.order.tolist(), plan.kinds.tolist(), strict=True):
        lo, hi = int(plan.offsets[g]), int(plan.offsets[g + 1])
        items = plan.rows[lo:hi]
        if not mixed:
            yield np.take(arrays.blocks[:, n, :].T, items, axis=1)  # one contiguous copy
            continue
        block = encode(arrays.blocks[items, n, :], kind,
                       f"{arrays.source}: item group {g}, block {n}",
                       row_scale=None if shared is None else shared[lo:hi])
        yield from block.payload()


def _check_optional(arrays: GroupArrays, user: int | None, item_ids: np.ndarray | None,
                    seen: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    ids = None
    if item_ids is not None:
        ids = np.asarray(item_ids)
        if ids.shape != (arrays.n_items,) or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"item_ids: expected {arrays.n_items} integers (one per item)")
    s = None
    if seen is not None:
        if user is None:
            raise ValueError("seen: a seen list belongs to one user; give user= as well")
        s = np.unique(np.asarray(seen).astype(np.int64))
        if s.size and (s[0] < 0 or s[-1] >= arrays.n_items):
            raise ValueError(f"seen: item indices must be in [0, {arrays.n_items})")
        s = s if s.size else None
    if user is not None:
        arrays.user_row(user)  # fail before any work if the user is not in the group
    return ids, s


def plan_package(arrays: GroupArrays, budget: int | float | str, *, user: int | None = None,
                 group: int | None = None, options: DeployOptions | None = None,
                 item_ids: np.ndarray | None = None,
                 seen: np.ndarray | None = None) -> BudgetReport:
    """The accounting of :func:`build_package` with the same arguments, without writing."""
    ids, s = _check_optional(arrays, user, item_ids, seen)
    return _plan(arrays, budget, user, group, options or DeployOptions(), ids,
                 s).layout.report


def build_package(path: str | os.PathLike[str], arrays: GroupArrays,
                  budget: int | float | str, *, user: int | None = None,
                  group: int | None = None, options: DeployOptions | None = None,
                  item_ids: np.ndarray | None = None,
                  seen: np.ndarray | None = None) -> BudgetReport:
    """Write the package of one user group (and optionally one user) for ``budget``.

    ``user`` (a value of ``arrays.users``) stores that user's embedding and makes the package
    rank on its own; without it the package serves every user of the group and the device
    supplies the embedding (its bytes are still reserved in the budget). ``group`` is recorded
    in the header. ``seen`` (item indices the user already has) is stored for a user package
    and excluded when ranking the stored user. ``item_ids`` (original ids, int64) are returned
    with rankings but cost 8 bytes per item of the budget.
    Raises ``BudgetError`` (a ``ValueError``) naming the minimum when the budget is too small;
    nothing is written then.
    """
    ids, s = _check_optional(arrays, user, item_ids, seen)
    plan = _plan(arrays, budget, user, group, options or DeployOptions(), ids, s)
    label_dtype = plan.layout.spec.label_dtype
    shared = (shared_row_scales(arrays, plan.rows, plan.offsets)
              if plan.layout.spec.shared_scale else None)
    contents: dict[str, np.ndarray | Iterator[np.ndarray]] = {
        "group_offsets": plan.offsets,
        "item_group": arrays.item_group.astype(label_dtype),
        "selection": plan.order.astype("<u2"),
        "weights": arrays.alpha[plan.order[:, 0], plan.order[:, 1]].astype("<f4"),
        "blocks": _block_parts(arrays, plan, shared),
    }
    if plan.layout.spec.mixed:
        contents["kinds"] = plan.kinds.astype("|u1")
    if shared is not None:
        contents["row_scale"] = shared
    if ids is not None:
        contents["item_ids"] = ids.astype("<i8")
    if user is not None:
        contents["user_emb"] = arrays.user_emb[arrays.user_row(user)]
    if s is not None:
        contents["seen"] = s.astype("<i4")
    return write_package(path, plan.layout, contents)
