"""The device runtime (peel.device): Eq. 10 scoring, ranking, exclusions and instant shrink."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peel.budget import BudgetError, minimum_budget, selection_order
from peel.device import Package, PackageError, open_package, shrink_file
from peel.package import (
    PRECISION_CHOICES,
    DeployOptions,
    GroupArrays,
    build_package,
    check_group_arrays,
    synthetic_group,
)


@pytest.fixture(scope="module")
def group() -> GroupArrays:
    return synthetic_group(n_items=700, n_blocks=6, block_dim=3, n_item_groups=7, n_users=6,
                           seed=11)


def _build(tmp: Path, arrays: GroupArrays, budget: object, name: str = "p.peel",
           **kw: object) -> Package:
    fields = ("similarity", "weighting", "scale", "selection", "seed", "precision")
    options = DeployOptions(**{k: kw.pop(k) for k in fields if k in kw})  # type: ignore[arg-type]
    build_package(tmp / name, arrays, budget, options=options, **kw)  # type: ignore[arg-type]
    return open_package(tmp / name)


def stored_arrays(arrays: GroupArrays, pkg: Package) -> GroupArrays:
    """``arrays`` with every kept block replaced by what the package stores for it (decoded
    float16 / int8 values), so brute force checks the kernels, not the rounding."""
    blocks = arrays.blocks.copy()
    for g, n in pkg.selection.tolist():
        blocks[np.flatnonzero(arrays.item_group == g), n, :] = pkg.item_blocks(g, n)
    return GroupArrays(blocks, arrays.alpha, arrays.item_group, arrays.users, arrays.user_emb)


def brute_force_scores(arrays: GroupArrays, selection: np.ndarray, user: np.ndarray,
                       similarity: str, weighting: str = "none",
                       scale: str = "eq10") -> np.ndarray:
    """Eq. 10 item by item, straight from the paper's text, in float64 (``scale="none"``
    leaves out the factor max_k |S_k| / |S_g|); ``arrays`` hold a refined block's values with
    its refinement (:func:`stored_arrays`)."""
    n_groups, n_blocks = arrays.alpha.shape
    d = arrays.blocks.shape[2]
    # a refined block (listed again with kind "r4s") is still one block of Eq. 10
    chosen = {g: list(dict.fromkeys(int(n) for gg, n in selection if gg == g))
              for g in range(n_groups)}
    most = max(len(v) for v in chosen.values())
    u = user.astype(np.float64)
    out = np.zeros(arrays.n_items)
    for j in range(arrays.n_items):
        blocks = chosen[int(arrays.item_group[j])]
        total = 0.0
        for n in blocks:
            e = arrays.blocks[j, n].astype(np.float64)
            if similarity == "literal":
                rep = np.tile(e, n_blocks)  # the block repeated N times
            else:
                rep = np.zeros(n_blocks * d)
                rep[n * d:(n + 1) * d] = e  # the block at its own position
            weight = arrays.alpha[int(arrays.item_group[j]), n] if weighting == "alpha" else 1
            total += weight * float(u @ rep)
        out[j] = (most / len(blocks) if scale == "eq10" else 1.0) * total
    return out


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "int8o", "int4", "int8s", "int4s",
                                       "int4r50", "int4r100"])
@pytest.mark.parametrize("scale", ["eq10", "none"])
@pytest.mark.parametrize("similarity", ["aligned", "literal"])
def test_scores_match_eq10_brute_force(tmp_path: Path, similarity: str, scale: str,
                                       precision: str) -> None:
    rng = np.random.default_rng(5)
    n_items = 90
    groups = rng.integers(0, 5, n_items)
    groups[groups == 3] = 2  # group 3 is empty, sizes are unequal
    raw = check_group_arrays(np.tanh(rng.standard_normal((n_items, 4, 3))) + 0.3,
                             rng.random((5, 4)), groups, np.arange(3),
                             rng.standard_normal((3, 12)))
    # some item groups keep fewer blocks (and with int4r*, some blocks their refinement)
    budget = 0.5 if precision == "int4s" else 0.6
    pkg = _build(tmp_path, raw, budget, similarity=similarity, weighting="none", scale=scale,
                 user=1, precision=precision)
    assert (pkg.similarity, pkg.scale, pkg.precision) == (similarity, scale, precision)
    arrays = stored_arrays(raw, pkg)
    assert len({s.size for s in pkg.block_sets()}) > 1  # the Eq. 10 factor matters here
    if precision.startswith("int4r"):
        assert 0 < pkg.refinements().sum() < pkg.n_selected - pkg.spec.n_groups
    for u in range(3):
        expected = brute_force_scores(arrays, pkg.selection, arrays.user_emb[u], similarity,
                                      scale=scale)
        np.testing.assert_allclose(pkg.scores(arrays.user_emb[u]), expected, rtol=1e-5,
                                   atol=1e-5)
        ranking = pkg.rank(arrays.user_emb[u], k=10)
        np.testing.assert_array_equal(ranking.items, np.argsort(-expected, kind="stable")[:10])
        np.testing.assert_allclose(ranking.scores, expected[ranking.items], rtol=1e-5,
                                   atol=1e-5)
    other = "literal" if similarity == "aligned" else "aligned"
    np.testing.assert_allclose(
        pkg.scores(arrays.user_emb[0], similarity=other),
        brute_force_scores(arrays, pkg.selection, arrays.user_emb[0], other, scale=scale),
        rtol=1e-5, atol=1e-5)
    flipped = "none" if scale == "eq10" else "eq10"
    np.testing.assert_allclose(
        pkg.scores(arrays.user_emb[0], scale=flipped),
        brute_force_scores(arrays, pkg.selection, arrays.user_emb[0], similarity, scale=flipped),
        rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pkg.scores(), pkg.scores(arrays.user_emb[1]))  # stored user
    for weighted in ("aligned", "literal"):
        np.testing.assert_allclose(
            pkg.scores(arrays.user_emb[2], similarity=weighted, weighting="alpha"),
            brute_force_scores(arrays, pkg.selection, arrays.user_emb[2], weighted, "alpha",
                               scale),
            rtol=1e-5, atol=1e-5)


def test_stored_alpha_weighting_is_used(tmp_path: Path) -> None:
    arrays = synthetic_group(n_items=120, n_blocks=4, block_dim=2, n_item_groups=3, n_users=2)
    pkg = _build(tmp_path, arrays, "2KB", weighting="alpha", scale="eq10", user=0)
    assert pkg.weighting == "alpha"
    expected = brute_force_scores(stored_arrays(arrays, pkg), pkg.selection, arrays.user_emb[0],
                                  "aligned", "alpha")
    np.testing.assert_allclose(pkg.scores(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pkg.rank(k=5).items, np.argsort(-expected, kind="stable")[:5])
    with pytest.raises(ValueError, match="weighting"):
        pkg.rank(k=5, weighting="softmax")
    with pytest.raises(ValueError, match="scale"):
        pkg.rank(k=5, scale="max")


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-5), ("fp16", 2e-3),
                                                     ("int8", 2e-2), ("int8o", 2e-2),
                                                     ("int4", 0.25), ("int8s", 2e-2),
                                                     ("int4s", 0.35), ("int4r50", 2e-2)])
def test_full_budget_aligned_equals_plain_dot_product(tmp_path: Path, precision: str,
                                                      tolerance: float) -> None:
    arrays = synthetic_group(n_items=50, n_blocks=4, block_dim=2, n_item_groups=3, n_users=2)
    pkg = _build(tmp_path, arrays, "1MB", weighting="none", precision=precision)
    assert pkg.n_selected == pkg.spec.n_pairs  # every block fits, so every factor is 1
    assert sum(s.size for s in pkg.block_sets()) == 12
    full = arrays.blocks.reshape(50, 8) @ arrays.user_emb[0]
    np.testing.assert_allclose(pkg.scores(arrays.user_emb[0]), full, rtol=tolerance,
                               atol=tolerance)


@pytest.mark.parametrize("precision", ["fp16", "int8", "int8o", "int4", "int8s", "int4s",
                                       "int4r100"])
def test_quantised_kernels_with_large_tiles_and_extreme_users(tmp_path: Path,
                                                              precision: str) -> None:
    """Blocks longer than one decode tile, and user vectors large enough that the 2^112
    float16 bias can no longer be folded into the query: still the brute-force scores."""
    arrays = synthetic_group(n_items=20_000, n_blocks=2, block_dim=3, n_item_groups=1,
                             n_users=1, seed=3)
    pkg = _build(tmp_path, arrays, "10MB", precision=precision)
    stored = stored_arrays(arrays, pkg)
    for magnitude in (1e-30, 1.0, 1e6, 1e30):
        user = arrays.user_emb[0] * np.float32(magnitude)
        expected = brute_force_scores(stored, pkg.selection, user, "aligned", scale="none")
        np.testing.assert_allclose(pkg.scores(user), expected, rtol=1e-5,
                                   atol=1e-5 * magnitude)
        batch = pkg.scores(np.stack([user, user]))
        np.testing.assert_allclose(batch[1], expected, rtol=1e-5, atol=1e-5 * magnitude)


def test_exclusions_and_short_lists(group: GroupArrays, tmp_path: Path) -> None:
    pkg = _build(tmp_path, group, 0.5, user=2, seen=[0, 1, 2, 3])
    u = group.user_emb[2]
    top = pkg.rank(u, k=20).items
    ranking = pkg.rank(u, k=20, exclude=top[:5])
    assert not set(top[:5].tolist()) & set(ranking.items.tolist())
    np.testing.assert_array_equal(ranking.items[:15], top[5:])
    stored = pkg.rank(k=group.n_items)  # the stored user: the seen list is excluded
    assert stored.items.size == group.n_items - 4
    assert not {0, 1, 2, 3} & set(stored.items.tolist())
    assert pkg.rank(u, k=group.n_items).items.size == group.n_items  # explicit: not excluded
    short = pkg.rank(u, k=5, exclude=np.arange(3, group.n_items))  # only 3 items remain
    assert sorted(short.items.tolist()) == [0, 1, 2] and np.all(np.diff(short.scores) <= 0)
    with pytest.raises(ValueError, match="outside"):
        pkg.rank(u, exclude=[group.n_items])
    with pytest.raises(ValueError, match="positive"):
        pkg.rank(u, k=0)
    with pytest.raises(ValueError, match="shape"):
        pkg.rank(u[:5])
    with pytest.raises(ValueError, match="rank_batch"):
        pkg.rank(u[None, :])
    np.testing.assert_array_equal(pkg.scores(u)[top], pkg.rank(u, k=20).scores)
    with pytest.raises(ValueError, match="finite"):
        pkg.rank(np.full_like(u, np.nan))
    with pytest.raises(ValueError, match="similarity"):
        pkg.rank(u, similarity="cosine")


def test_ties_go_to_the_lower_item_index(tmp_path: Path) -> None:
    arrays = synthetic_group(n_items=400, n_blocks=2, block_dim=2, n_item_groups=4, n_users=1)
    flat = GroupArrays(np.zeros_like(arrays.blocks), arrays.alpha, arrays.item_group,
                       arrays.users, arrays.user_emb)
    pkg = _build(tmp_path, flat, "10KB")
    assert pkg.rank(arrays.user_emb[0], k=7).items.tolist() == list(range(7))
    assert pkg.rank(arrays.user_emb[0], k=3, exclude=[1]).items.tolist() == [0, 2, 3]


def test_rank_batch_matches_single_ranking(group: GroupArrays, tmp_path: Path) -> None:
    ids = np.arange(group.n_items) + 1000
    pkg = _build(tmp_path, group, 0.4, item_ids=ids)
    users = np.concatenate([group.user_emb, group.user_emb[:1]])
    indptr = np.array([0, 3, 3, 5, 5, 5, 5, 5 + group.n_items - 3])
    indices = np.concatenate([[1, 2, 3], [10, 11], np.arange(3, group.n_items)])
    batch = pkg.rank_batch(users, k=15, exclude_indptr=indptr, exclude_indices=indices,
                           batch_size=4)
    for b in range(users.shape[0]):
        single = pkg.rank(users[b], k=15, exclude=indices[indptr[b]:indptr[b + 1]])
        m = single.items.size
        assert batch.n_valid[b] == m
        np.testing.assert_array_equal(batch.items[b, :m], single.items)
        np.testing.assert_allclose(batch.scores[b, :m], single.scores, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(batch.ids[b, :m], single.ids)
        assert np.all(batch.items[b, m:] == -1) and np.all(batch.ids[b, m:] == -1)
    assert batch.n_valid[-1] == 3  # every item but 0, 1, 2 excluded
    np.testing.assert_allclose(pkg.scores(users), np.stack([pkg.scores(u) for u in users]),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="indptr"):
        pkg.rank_batch(users, exclude_indptr=indptr[:-1], exclude_indices=indices)


def test_group_package_needs_a_user_vector(group: GroupArrays, tmp_path: Path) -> None:
    pkg = _build(tmp_path, group, 0.5)
    assert pkg.user_emb is None
    with pytest.raises(PackageError, match="--user"):
        pkg.rank()
    assert pkg.rank(group.user_emb[0], k=3).items.size == 3


def test_shrink_is_a_view_and_refuses_what_it_cannot_do(group: GroupArrays,
                                                        tmp_path: Path) -> None:
    pkg = _build(tmp_path, group, 0.9, user=0)
    pkg.rank(k=5)  # build the kernel views, as a running device would have
    small = pkg.shrink(0.3)
    assert small.n_selected < pkg.n_selected
    assert np.shares_memory(small.blocks, pkg.blocks)
    assert all(a[2] is b[2] for a, b in zip(small._kernel(), pkg._kernel(), strict=False))
    assert pkg.shrink(pkg.budget) is not None
    minimum = minimum_budget(pkg.spec, pkg.selection, pkg.kinds)
    assert minimum == pkg.minimum_budget()
    floor = pkg.shrink(minimum)
    assert floor.n_selected == group.alpha.shape[0]  # one block per item group is left
    assert all(s.size == 1 for s in floor.block_sets())
    with pytest.raises(BudgetError, match=f"{minimum:,} B"):
        pkg.shrink(minimum - 1)
    with pytest.raises(PackageError, match="cannot grow"):
        small.shrink(pkg.budget)


sizes = st.tuples(st.integers(1, 60), st.integers(1, 5), st.integers(1, 4), st.integers(1, 6),
                  st.integers(0, 10_000))


@settings(max_examples=40, deadline=None)
@given(shape=sizes, similarity=st.sampled_from(["aligned", "literal"]),
       weighting=st.sampled_from(["none", "alpha"]), scale=st.sampled_from(["none", "eq10"]),
       selection=st.sampled_from(["importance", "random"]), user=st.sampled_from([None, 1]),
       precision=st.sampled_from(PRECISION_CHOICES), data=st.data())
def test_shrink_equals_a_direct_build(shape: tuple[int, int, int, int, int], similarity: str,
                                      weighting: str, scale: str, selection: str,
                                      user: int | None, precision: str,
                                      data: st.DataObject) -> None:
    n_items, n_blocks, block_dim, n_groups, seed = shape
    arrays = synthetic_group(n_items, n_blocks, block_dim, n_groups, 2, seed)
    if data.draw(st.booleans()):  # ties in alpha
        arrays = GroupArrays(arrays.blocks, np.round(arrays.alpha * 4) / 4, arrays.item_group,
                             arrays.users, arrays.user_emb)
    kw = dict(similarity=similarity, weighting=weighting, scale=scale, selection=selection,
              seed=seed % 7, user=user, precision=precision)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        complete = _build(tmp, arrays, 1 << 30, "all.peel", **kw)
        minimum = complete.minimum_budget()
        big_budget = data.draw(st.integers(minimum, complete.report.total + 64))
        big = _build(tmp, arrays, big_budget, "big.peel", **kw)
        budget = data.draw(st.integers(minimum, big.budget))
        assert big.selection.tobytes() == complete.selection[: big.n_selected].tobytes()
        direct = _build(tmp, arrays, budget, "direct.peel", **kw)
        small = big.shrink(budget)
        np.testing.assert_array_equal(small.selection, direct.selection)
        np.testing.assert_array_equal(small.kinds, direct.kinds)
        np.testing.assert_array_equal(small.blocks, direct.blocks)
        assert small.report == direct.report and small.report.total <= budget
        assert all(s.size >= 1 for s in small.block_sets())
        np.testing.assert_array_equal(small.selection, big.selection[: small.n_selected])
        u = arrays.user_emb[0]
        np.testing.assert_array_equal(small.scores(u), direct.scores(u))
        a, b = small.rank(u, k=10), direct.rank(u, k=10)
        np.testing.assert_array_equal(a.items, b.items)
        np.testing.assert_array_equal(a.scores, b.scores)
        report = shrink_file(tmp / "big.peel", tmp / "shrunk.peel", budget)
        assert (tmp / "shrunk.peel").read_bytes() == (tmp / "direct.peel").read_bytes()
        assert report == direct.report


def test_importance_selection_beats_random_on_alpha(group: GroupArrays, tmp_path: Path) -> None:
    imp = _build(tmp_path, group, 0.3, "imp.peel")
    rnd = _build(tmp_path, group, 0.3, "rnd.peel", selection="random", seed=1)
    kept = lambda p: group.alpha[p.selection[:, 0], p.selection[:, 1]].sum()  # noqa: E731
    assert imp.n_selected == rnd.n_selected or abs(imp.n_selected - rnd.n_selected) <= 2
    assert kept(imp) >= kept(rnd)
    blocks = imp.selection[~imp.refinements()]  # the default may refine kept blocks too
    np.testing.assert_array_equal(blocks, selection_order(group.alpha)[: len(blocks)])


def test_device_never_imports_torch_or_scipy(group: GroupArrays, tmp_path: Path) -> None:
    build_package(tmp_path / "p.peel", group, 0.5, user=1)
    build_package(tmp_path / "v.peel", group, 0.5, user=1,
                  options=DeployOptions(precision="value"))
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from peel.device import open_package, shrink_file\n"
        f"p = open_package({str(tmp_path / 'p.peel')!r})\n"
        "p.rank(k=5)\n"
        f"q = open_package({str(tmp_path / 'v.peel')!r})\n"
        "q.rank(k=5)\n"
        "q.rank_batch(np.ones((3, q.spec.dim), dtype=np.float32), k=5)\n"
        "q.item_blocks(*q.selection[0].tolist())\n"
        "p.rank_batch(np.ones((3, p.spec.dim), dtype=np.float32), k=5)\n"
        f"p.shrink(0.3).save({str(tmp_path / 'q.peel')!r})\n"
        "bad = sorted(m for m in ('torch', 'scipy', 'sklearn', 'pandas') if m in sys.modules)\n"
        "print('LOADED', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert "LOADED []" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("precision", ["fp16", "int8o", "int4", "int4s", "int4r50"])
def test_many_users_at_once_in_bounded_memory(tmp_path: Path, precision: str) -> None:
    arrays = synthetic_group(n_items=3000, n_blocks=2, block_dim=4, n_item_groups=2,
                             n_users=300, seed=4)
    pkg = _build(tmp_path, arrays, 1.0, precision=precision)
    many = pkg.scores(arrays.user_emb)  # 300 users: tiles of fewer rows
    for u in (0, 150, 299):
        np.testing.assert_allclose(many[u], pkg.scores(arrays.user_emb[u]), rtol=1e-5,
                                   atol=1e-5)


def reference_rank(pkg: Package, user: np.ndarray, k: int,
                   exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` the straightforward way: every kept block decoded to float64 (what
    ``item_blocks`` returns), one dot product per block and item, a full stable sort."""
    spec = pkg.spec
    u = user.astype(np.float64).reshape(spec.n_blocks, spec.block_dim)
    rows = np.zeros(spec.n_items)
    for g, n in dict.fromkeys(map(tuple, pkg.selection.tolist())):  # a refined block once
        lo, hi = int(pkg.group_offsets[g]), int(pkg.group_offsets[g + 1])
        rows[lo:hi] += pkg.item_blocks(g, n).astype(np.float64) @ u[n]
    perm = np.argsort(pkg.item_group, kind="stable")  # stored rows -> item indices
    scores = np.empty(spec.n_items)
    scores[perm] = rows
    scores[exclude] = -np.inf
    top = np.argsort(-scores, kind="stable")[:k]
    return top, scores[top]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "int8o", "int4", "int8s", "int4s",
                                       "value", "int4r25"])
@pytest.mark.parametrize("path", ["stacked", "by_block"])
def test_fast_kernel_matches_a_reference_ranking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 precision: str, path: str) -> None:
    """Both kernels of ``rank`` (an item group's float16 / int8 blocks stacked into one tile,
    or block by block in tiles when the group is too large) give the reference's top-K."""
    import peel.device as device

    arrays = synthetic_group(n_items=2_400, n_blocks=8, block_dim=4, n_item_groups=5,
                             n_users=6, seed=7)
    if precision == "value":  # rows spanning 1e-6 .. 1e3 that int8 cannot hold: mixed kinds
        blocks, users = arrays.blocks.copy(), arrays.user_emb.copy()
        for g, n in ((0, 0), (1, 2), (3, 5)):
            blocks[arrays.item_group == g, n, :] = np.array([1e3, 1e-3, -1e-3, 1e-6])
            users[:, n * 4] = 0  # the users look at the small values only
        arrays = GroupArrays(blocks, arrays.alpha, arrays.item_group, arrays.users, users)
    pkg = _build(tmp_path, arrays, 0.45, precision=precision, weighting="none", scale="none")
    sizes = np.diff(pkg.group_offsets)
    stack_needed = int(sizes.max()) * pkg.spec.block_dim * pkg.spec.n_blocks
    if path == "stacked":
        assert stack_needed <= device._STACK  # every group fits one stacked tile
    else:
        monkeypatch.setattr(device, "_STACK", 0)  # every group block by block ...
        monkeypatch.setattr(device, "_TILE", 128)  # ... in several tiles of rows
    if precision == "value":
        assert len({k for k, c in pkg.kind_counts().items() if c}) > 1  # mixed kinds
    rng = np.random.default_rng(3)
    for u in range(arrays.user_emb.shape[0]):
        exclude = rng.choice(arrays.n_items, 60, replace=False)
        ranking = pkg.rank(arrays.user_emb[u], k=40, exclude=exclude)
        items, scores = reference_rank(pkg, arrays.user_emb[u], 40, exclude)
        np.testing.assert_array_equal(ranking.items, items)
        np.testing.assert_allclose(ranking.scores, scores, rtol=1e-5, atol=1e-5)


def test_kernel_buffers_follow_the_block_dim(tmp_path: Path) -> None:
    """One thread ranks a d = 8 package, then a d = 2 one whose stacked int8 rows outnumber
    what the first package's buffers hold per value: the buffers must follow d."""
    wide = synthetic_group(n_items=400, n_blocks=4, block_dim=8, n_item_groups=2, n_users=1)
    narrow = synthetic_group(n_items=6_000, n_blocks=8, block_dim=2, n_item_groups=3,
                             n_users=2, seed=2)
    first = _build(tmp_path, wide, 1.0, "wide.peel", precision="int8")
    first.rank(wide.user_emb[0], k=5)
    pkg = _build(tmp_path, narrow, 1.0, "narrow.peel", precision="int8o")
    for u in range(2):
        items, scores = reference_rank(pkg, narrow.user_emb[u], 30, np.zeros(0, np.int64))
        ranking = pkg.rank(narrow.user_emb[u], k=30)
        np.testing.assert_array_equal(ranking.items, items)
        np.testing.assert_allclose(ranking.scores, scores, rtol=1e-5, atol=1e-5)
