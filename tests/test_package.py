"""Package files (peel.package): layout, budgets, integrity, run folders and the CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peel import cli_device
from peel.budget import BLOCK_KINDS, MB, PRECISIONS, BudgetError, full_table_bytes
from peel.device import PackageError, open_package, read_package
from peel.package import (
    DEFAULT_PRECISION,
    DEFAULT_SCALE,
    DEFAULT_SIMILARITY,
    DEFAULT_WEIGHTING,
    PRECISION_CHOICES,
    DeployOptions,
    GroupArrays,
    build_package,
    check_group_arrays,
    find_user_group,
    load_group,
    plan_package,
    precision_order,
    quantisation_errors,
    synthetic_group,
)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def group() -> GroupArrays:
    return synthetic_group(n_items=600, n_blocks=8, block_dim=4, n_item_groups=6, n_users=5)


def test_file_size_matches_the_accounting(group: GroupArrays, tmp_path: Path) -> None:
    for budget in ("40KB", 0.3, 1.0):
        for user in (None, 2):
            path = tmp_path / f"p_{budget}_{user}.peel"
            report = build_package(path, group, budget, user=user)
            size = path.stat().st_size
            assert size == report.file_bytes
            assert abs(size - report.total) <= 0.03 * report.total  # within a few percent
            assert report.total <= report.budget
            assert report == plan_package(group, budget, user=user)


#: Largest |stored - true| of one value, relative to its row's largest |value|, per kind.
TOLERANCE = {"f32": 0.0, "f16": 2.0**-11, "i8": 0.5 / 127 * 1.001, "i8o": 1.0 / 127 * 1.001,
             "i4": 0.5 / 7 * 1.001}  # half a code step of the row's peak
#: The largest code of each shared-scale kind; "r4s": a 4-bit block with its refinement, whose
#: error is within half a step of a 15-level code of the block's half step (7 x 14 levels).
SHARED_TOP = {"i8s": 127, "i4s": 7, "r4s": 98}


@pytest.mark.parametrize("precision", PRECISION_CHOICES)
def test_package_round_trip_and_grouped_layout(group: GroupArrays, tmp_path: Path,
                                               precision: str) -> None:
    build_package(tmp_path / "p.peel", group, 0.5, user=3, group=7,
                  options=DeployOptions(precision=precision))
    pkg = open_package(tmp_path / "p.peel")
    assert pkg.spec.user == 3 and pkg.spec.group == 7
    assert pkg.similarity == DEFAULT_SIMILARITY and pkg.weighting == DEFAULT_WEIGHTING
    assert pkg.scale == DEFAULT_SCALE
    rule = DEFAULT_PRECISION if precision == "auto" else precision
    assert pkg.precision == rule
    assert pkg.spec.version == {"fp32": 3, "int4": 5, "int8s": 6, "int4s": 6}.get(
        rule, 7 if rule.startswith("int4r") else 4)
    np.testing.assert_array_equal(pkg.weights, group.alpha[pkg.selection[:, 0],
                                                            pkg.selection[:, 1]].astype(np.float32))
    np.testing.assert_array_equal(pkg.user_emb, group.user_emb[3])
    refined = {tuple(p) for p in pkg.selection[pkg.refinements()].tolist()}
    for (g, n), kind in zip(pkg.selection.tolist(), pkg.kinds.tolist(), strict=True):
        items = np.flatnonzero(group.item_group == g)  # stored grouped, by item index
        true = group.blocks[items, n, :]
        stored = pkg.item_blocks(g, n)  # a refined block: with its refinement
        name = "r4s" if (g, n) in refined else BLOCK_KINDS[kind]
        if name in SHARED_TOP:  # half a code step of row scale x column scale
            r = pkg.row_scale[pkg.group_offsets[g]: pkg.group_offsets[g + 1]]
            r = r.astype(np.float64)[:, None]
            col = (np.abs(true) / r).max(axis=0, keepdims=True) / SHARED_TOP[name]
            assert np.all(np.abs(stored - true) <= 0.5 * r * col * 1.001 + 1e-7)
            continue
        peak = np.abs(true).max(axis=1, keepdims=True)
        assert np.all(np.abs(stored - true) <= TOLERANCE[name] * peak + 1e-7)
        if BLOCK_KINDS[kind] == "f32":
            np.testing.assert_array_equal(stored, true)
    for arr in (pkg.blocks, pkg.selection, pkg.item_group, pkg.kinds):
        assert not arr.flags.writeable  # views of the mapping
    for arr in (pkg.blocks, pkg.selection, pkg.item_group):
        assert not arr.flags.owndata


@pytest.mark.parametrize("precision", PRECISION_CHOICES)
def test_smaller_budget_is_a_byte_prefix(group: GroupArrays, tmp_path: Path,
                                         precision: str) -> None:
    options = DeployOptions(precision=precision)
    build_package(tmp_path / "big.peel", group, 0.8, options=options)
    # at 30% every 4-bit block fits, and every int8 one with shared scales
    smaller = {"int4": 0.15, "int8s": 0.15, "int4s": 0.1}.get(
        precision, 0.15 if precision.startswith("int4r") else 0.3)
    build_package(tmp_path / "small.peel", group, smaller, options=options)
    big, small = open_package(tmp_path / "big.peel"), open_package(tmp_path / "small.peel")
    assert small.n_selected < big.n_selected
    np.testing.assert_array_equal(small.selection, big.selection[: small.n_selected])
    np.testing.assert_array_equal(small.kinds, big.kinds[: small.n_selected])
    np.testing.assert_array_equal(small.blocks, big.blocks[: small.blocks.size])


def test_lower_precision_keeps_more_blocks_for_the_same_bytes(group: GroupArrays) -> None:
    kept = {p: plan_package(group, 0.3, options=DeployOptions(precision=p)).n_selected
            for p in PRECISIONS}
    assert kept["fp32"] < kept["fp16"] <= kept["int8o"] < kept["int8"] < kept["int4"]
    assert kept["int8"] < kept["int8s"]  # 2 bytes per item, not per item and block
    small = {p: plan_package(group, 0.15, options=DeployOptions(precision=p)).n_selected
             for p in ("int4", "int4s")}
    assert small["int4"] < small["int4s"]
    reports = [plan_package(group, 0.3, options=DeployOptions(precision=p)) for p in PRECISIONS]
    assert all(r.total <= r.budget for r in reports)


# ------------------------------------------------------------- format versions (v3 files)


def fixture_arrays() -> GroupArrays:
    """The arrays tests/fixtures/v3_*.peel were written from (by peel at commit dc26696, the
    last writer before mixed precision), with ``build_package(.., 2700, user=1, group=0,
    seen=[3, 5], item_ids=arange(40) * 10)`` and ``build_package(.., 2300, group=2)``."""
    n_items, n_blocks, d, n_groups = 40, 4, 3, 3
    blocks = np.sin(np.arange(n_items * n_blocks * d).reshape(n_items, n_blocks, d) * 0.37)
    alpha = ((np.arange(n_groups * n_blocks) * 7 % 12) + 1).reshape(n_groups, n_blocks) / 12
    item_group = np.arange(n_items) * 7 % n_groups
    user_emb = np.cos(np.arange(2 * n_blocks * d)).reshape(2, n_blocks * d)
    return check_group_arrays(blocks.astype(np.float32), alpha, item_group, np.array([0, 1]),
                              user_emb.astype(np.float32), source="fixture")


def test_fp32_packages_are_the_v3_files_byte_for_byte(tmp_path: Path) -> None:
    arrays, fp32 = fixture_arrays(), DeployOptions(precision="fp32")
    build_package(tmp_path / "user.peel", arrays, 2700, user=1, group=0, seen=[3, 5],
                  item_ids=np.arange(40) * 10, options=fp32)
    build_package(tmp_path / "group.peel", arrays, 2300, group=2, options=fp32)
    for name in ("user", "group"):
        written = (tmp_path / f"{name}.peel").read_bytes()
        assert written == (FIXTURES / f"v3_{name}.peel").read_bytes()
        assert int.from_bytes(written[8:12], "little") == 3  # the format version


def test_v3_files_still_open_rank_and_shrink(tmp_path: Path) -> None:
    arrays = fixture_arrays()
    pkg = open_package(FIXTURES / "v3_user.peel")
    assert pkg.spec.version == 3 and pkg.precision == "fp32"
    assert set(pkg.kind_counts()) == set(BLOCK_KINDS[:4]) and pkg.kind_counts()["f32"] == 7
    expected = np.zeros(arrays.n_items)
    for g, n in pkg.selection.tolist():
        items = np.flatnonzero(arrays.item_group == g)
        expected[items] += arrays.blocks[items, n, :] @ arrays.user_emb[1, n * 3:(n + 1) * 3]
    np.testing.assert_allclose(pkg.scores(), expected, rtol=1e-5, atol=1e-6)
    ranked = pkg.rank(k=5)
    assert not {3, 5} & set(ranked.items.tolist())
    np.testing.assert_array_equal(ranked.ids, ranked.items * 10)
    group = open_package(FIXTURES / "v3_group.peel")
    small = group.shrink(group.minimum_budget())
    small.save(tmp_path / "small.peel")
    assert open_package(tmp_path / "small.peel").n_selected == 3
    assert (tmp_path / "small.peel").read_bytes()[8:12] == (3).to_bytes(4, "little")


def test_v4_header_says_how_each_block_is_stored(group: GroupArrays, tmp_path: Path) -> None:
    build_package(tmp_path / "p.peel", group, 0.4, options=DeployOptions(precision="value"))
    raw = (tmp_path / "p.peel").read_bytes()
    header = json.loads(raw[64: 64 + int.from_bytes(raw[12:16], "little")])
    assert header["version"] == 4 and header["precision"] == "value"
    assert header["block_kinds"] == list(BLOCK_KINDS[:4])  # the v4 table: no 4-bit kind
    assert header["arrays"]["kinds"]["shape"] == [header["n_selected"]]
    assert header["arrays"]["blocks"]["dtype"] == "|u1"


def test_int4_packages_are_v5_and_hold_two_codes_a_byte(group: GroupArrays,
                                                        tmp_path: Path) -> None:
    build_package(tmp_path / "p.peel", group, 0.4, options=DeployOptions(precision="int4"))
    raw = (tmp_path / "p.peel").read_bytes()
    header = json.loads(raw[64: 64 + int.from_bytes(raw[12:16], "little")])
    assert header["version"] == 5 == int.from_bytes(raw[8:12], "little")
    assert header["block_kinds"] == list(BLOCK_KINDS[:5])  # the v5 table: no shared kinds
    pkg = open_package(tmp_path / "p.peel")
    assert pkg.kind_counts()["i4"] == pkg.n_selected
    d, counts = group.blocks.shape[2], np.diff(pkg.group_offsets)
    per_block = [-(-int(counts[g]) * ((d + 1) // 2 + 2) // 4) * 4 for g, _ in pkg.selection]
    assert pkg.blocks.size == sum(per_block)  # ceil(d/2) code bytes + a scale per row


@pytest.mark.parametrize("precision", ["int8s", "int4s"])
def test_shared_scale_packages_are_v6_with_one_row_scale_per_item(
        group: GroupArrays, tmp_path: Path, precision: str) -> None:
    build_package(tmp_path / "p.peel", group, 0.2, options=DeployOptions(precision=precision))
    raw = (tmp_path / "p.peel").read_bytes()
    header = json.loads(raw[64: 64 + int.from_bytes(raw[12:16], "little")])
    assert header["version"] == 6 == int.from_bytes(raw[8:12], "little")
    assert header["block_kinds"] == list(BLOCK_KINDS[:7])  # v6: without "r4s"
    assert header["arrays"]["row_scale"] == {"dtype": "<f2", "shape": [group.n_items],
                                             "offset": header["arrays"]["row_scale"]["offset"]}
    pkg = open_package(tmp_path / "p.peel")
    kind = {"int8s": "i8s", "int4s": "i4s"}[precision]
    assert pkg.kind_counts()[kind] == pkg.n_selected
    d, counts = group.blocks.shape[2], np.diff(pkg.group_offsets)
    code_bytes = d if precision == "int8s" else (d + 1) // 2
    per_block = [-(-(4 * d + int(counts[g]) * code_bytes) // 4) * 4 for g, _ in pkg.selection]
    assert pkg.blocks.size == sum(per_block)  # d column scales, then the codes: no row scales
    assert pkg.report.item_blocks == pkg.blocks.size + 2 * group.n_items  # + row_scale
    # the row scale of an item is its largest value over its column's root mean square, over
    # every block (kept or not), so a smaller package keeps the same one
    g0 = np.flatnonzero(group.item_group == 0)
    x = group.blocks[g0].astype(np.float64)
    expect = (np.abs(x) / np.sqrt((x * x).mean(axis=0))).max(axis=(1, 2))
    r = pkg.row_scale[: g0.size].astype(np.float64)
    assert np.all(r >= expect) and np.allclose(r, expect, rtol=1e-3)
    smaller = pkg.shrink(0.1)
    np.testing.assert_array_equal(smaller.row_scale, pkg.row_scale)


def fixture_v4(name: str) -> tuple[Path, dict]:
    """tests/fixtures/v4_*.peel, written by peel at commit cb805ae (the last writer before the
    4-bit kind) from :func:`fixture_arrays`, and how."""
    how = {"user": dict(budget=1950, user=1, group=0, seen=[3, 5],
                        item_ids=np.arange(40) * 10, options=DeployOptions(precision="int8")),
           "group": dict(budget=1700, group=2, options=DeployOptions(precision="value"))}
    return FIXTURES / f"v4_{name}.peel", how[name]


@pytest.mark.parametrize("name", ["user", "group"])
def test_v4_files_are_still_written_byte_for_byte_and_open(tmp_path: Path, name: str) -> None:
    path, how = fixture_v4(name)
    kw = dict(how)
    build_package(tmp_path / "p.peel", fixture_arrays(), kw.pop("budget"), **kw)
    assert (tmp_path / "p.peel").read_bytes() == path.read_bytes()
    pkg = open_package(path)
    assert pkg.spec.version == 4 and "i4" not in pkg.kind_counts()
    smaller = pkg.shrink(pkg.minimum_budget())
    assert smaller.n_selected == 3 and smaller.spec.version == 4
    user = fixture_arrays().user_emb[1]
    assert np.all(np.isfinite(pkg.scores(user)))


#: tests/fixtures/vN_user.peel: written by peel at the commit named (the last writer before the
#: next format) with ``build_package(.., 1700, user=1, group=0, seen=[3, 5],
#: options=DeployOptions(precision=...))`` from :func:`fixture_arrays`; the kind it holds.
USER_FIXTURES = {5: ("bad7f2b", "int4", "i4"), 6: ("c63aff2", "int8s", "i8s")}


@pytest.mark.parametrize("version", sorted(USER_FIXTURES))
def test_v5_v6_files_are_still_written_byte_for_byte_and_open(tmp_path: Path,
                                                              version: int) -> None:
    _, precision, kind = USER_FIXTURES[version]
    path = FIXTURES / f"v{version}_user.peel"
    build_package(tmp_path / "p.peel", fixture_arrays(), 1700, user=1, group=0, seen=[3, 5],
                  options=DeployOptions(precision=precision))
    assert (tmp_path / "p.peel").read_bytes() == path.read_bytes()
    pkg = open_package(path)
    assert pkg.spec.version == version and (pkg.row_scale is not None) == (version == 6)
    # a v5 table names the kinds up to "i4", a v6 one up to "i4s" (no "r4s")
    assert list(pkg.kind_counts()) == list(BLOCK_KINDS[: {5: 5, 6: 7}[version]])
    assert pkg.kind_counts()[kind] == pkg.n_selected
    assert pkg.shrink(pkg.minimum_budget()).n_selected == 3
    assert np.all(np.isfinite(pkg.scores()))


# ------------------------------------------------------------- precision rules


@pytest.mark.parametrize("rule", ["int4r0", "int4r25", "int4r50", "int4r100"])
def test_refined_order_lists_every_block_then_its_refinement(group: GroupArrays,
                                                            rule: str) -> None:
    order, kinds = precision_order(group, rule)
    n_groups, n_blocks = group.alpha.shape
    assert len(order) == 2 * n_groups * n_blocks
    pairs = order[:, 0] * n_blocks + order[:, 1]
    base, refine = kinds == BLOCK_KINDS.index("i4s"), kinds == BLOCK_KINDS.index("r4s")
    assert np.all(base | refine)
    assert sorted(pairs[base].tolist()) == sorted(pairs[refine].tolist()) == list(
        range(n_groups * n_blocks))
    assert sorted(order[:n_groups, 0].tolist()) == list(range(n_groups)) and base[:n_groups].all()
    first = {p: i for i, p in reversed(list(enumerate(pairs.tolist())))}
    assert all(first[p] < i for i, p in enumerate(pairs.tolist()) if refine[i])
    weights = group.alpha[order[:, 0], order[:, 1]]
    tail = np.where(base, weights, float(rule[5:]) / 100 * weights)[n_groups:]
    assert np.all(np.diff(tail) <= 1e-12)  # by (discounted) weight, descending
    if rule == "int4r0":  # every block before any refinement
        assert base[: n_groups * n_blocks].all()


def test_refinement_is_a_second_4bit_term_of_the_same_block(group: GroupArrays) -> None:
    from peel.quantize import encode, row_scales

    items = np.flatnonzero(group.item_group == 1)
    x = group.blocks[items].astype(np.float64)
    scale = row_scales(x)
    base = encode(x[:, 2], BLOCK_KINDS.index("i4s"), row_scale=scale)
    more = encode(x[:, 2], BLOCK_KINDS.index("r4s"), row_scale=scale)
    assert more.nbytes == base.nbytes  # the same layout: column scales, then packed codes
    rest = np.abs(x[:, 2] - base.decoded).max()
    assert rest > 0
    assert np.abs(x[:, 2] - base.decoded - more.decoded).max() < rest / 7  # ~8 bits in all
    errors = quantisation_errors(group)
    i4s, r4s = BLOCK_KINDS.index("i4s"), BLOCK_KINDS.index("r4s")
    assert np.all(errors[:, :, r4s] < errors[:, :, i4s] / 5)


def test_kept_pairs_lists_a_refined_block_once(group: GroupArrays) -> None:
    from peel.package import kept_pairs

    d = group.blocks.shape[2]
    pairs = kept_pairs(group.alpha, group.item_group, d, 1.0, DeployOptions(precision="int4r50"))
    assert len(pairs) == group.alpha.size
    assert len({tuple(p) for p in pairs.tolist()}) == group.alpha.size


def test_value_rule_measures_errors_and_pays_for_precision_only_where_it_matters() -> None:
    arrays = synthetic_group(n_items=300, n_blocks=4, block_dim=4, n_item_groups=3, n_users=6)
    errors = quantisation_errors(arrays)
    assert errors.shape == (3, 4, len(BLOCK_KINDS))
    assert np.all(errors[:, :, 0] == 0)  # float32 is exact
    assert np.all(errors[:, :, 1] < errors[:, :, 2])  # float16 beats int8 on tanh blocks
    assert np.all(errors[:, :, 3] <= errors[:, :, 2] * 1.5)
    assert np.all(errors[:, :, 4] > 5 * errors[:, :, 2])  # 15 levels, not 255
    order, kinds = precision_order(arrays, "value")
    assert set(kinds.tolist()) == {2}  # int8 is the most value per byte among v4's kinds
    # one row per item spanning 1e-6 .. 1e3 in block 0 of group 0: int8 loses the small values
    blocks = arrays.blocks.copy()
    items = np.flatnonzero(arrays.item_group == 0)
    blocks[items, 0, :] = np.array([1e3, 1e-3, -1e-3, 1e-6])
    users = arrays.user_emb.copy()
    users[:, 0] = 0  # the users only look at the small values
    skewed = GroupArrays(blocks, arrays.alpha, arrays.item_group, arrays.users, users)
    errors = quantisation_errors(skewed)
    assert errors[0, 0, 2] > 0.3 and errors[0, 0, 0] == 0
    order, kinds = precision_order(skewed, "value")
    picked = dict(zip(map(tuple, order.tolist()), kinds.tolist(), strict=True))
    assert picked[(0, 0)] in (0, 1)  # stored precisely; everything else stays int8
    assert all(k == 2 for pair, k in picked.items() if pair != (0, 0))


def test_values_beyond_float16_are_refused_or_kept_float32(tmp_path: Path) -> None:
    arrays = synthetic_group(n_items=60, n_blocks=2, block_dim=2, n_item_groups=2, n_users=2)
    big = GroupArrays(arrays.blocks * 1e9, arrays.alpha, arrays.item_group, arrays.users,
                      arrays.user_emb)  # beyond float16, and int8 scales beyond it too
    for precision in ("fp16", "int8", "int8o", "int4"):
        with pytest.raises(ValueError, match=r"float16's range.*fp32"):
            build_package(tmp_path / "p.peel", big, "1MB",
                          options=DeployOptions(precision=precision))
    assert not (tmp_path / "p.peel").exists()
    build_package(tmp_path / "v.peel", big, "1MB", options=DeployOptions(precision="value"))
    pkg = open_package(tmp_path / "v.peel")
    assert pkg.kind_counts()["f32"] == pkg.n_selected == 4
    with pytest.raises(ValueError, match="precision 'int2'"):
        build_package(tmp_path / "x.peel", arrays, "1MB",
                      options=DeployOptions(precision="int2"))


@pytest.mark.parametrize("precision", ["fp32", "value"])
def test_builds_are_deterministic(group: GroupArrays, tmp_path: Path, precision: str) -> None:
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        build_package(tmp_path / f"{name}.peel", group, "50KB",
                      options=DeployOptions(selection="random", seed=seed, precision=precision))
    a, b, c = ((tmp_path / f"{x}.peel").read_bytes() for x in "abc")
    assert a == b and a != c
    assert open_package(tmp_path / "a.peel").spec.seed == 3


def test_minimum_budget_is_refused_without_writing(group: GroupArrays, tmp_path: Path) -> None:
    with pytest.raises(BudgetError, match=r"minimum [\d,]+ B \([\d.]+ MB\)"):
        build_package(tmp_path / "p.peel", group, 1000)
    assert list(tmp_path.iterdir()) == []  # nothing left behind, not even a temporary


def test_item_ids_and_seen_are_stored_and_counted(group: GroupArrays, tmp_path: Path) -> None:
    ids = np.arange(group.n_items, dtype=np.int64) * 10 + 5
    fp32 = DeployOptions(precision="fp32")  # so that not every block fits
    plain = build_package(tmp_path / "a.peel", group, 1.0, user=1, options=fp32)
    report = build_package(tmp_path / "b.peel", group, 1.0, user=1, item_ids=ids,
                           seen=[4, 2, 2, 9], options=fp32)
    assert report.item_ids == group.n_items * 8 and report.seen == 3 * 4
    assert report.item_blocks < plain.item_blocks  # the ids take budget from blocks
    pkg = open_package(tmp_path / "b.peel")
    np.testing.assert_array_equal(pkg.item_ids, ids)
    np.testing.assert_array_equal(pkg.seen, [2, 4, 9])
    with pytest.raises(ValueError, match="user="):
        build_package(tmp_path / "c.peel", group, 1.0, seen=[1])
    with pytest.raises(ValueError, match="item_ids"):
        build_package(tmp_path / "c.peel", group, 1.0, item_ids=ids[:3])


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda b: b[:-1], "truncated"),
    (lambda b: b[:100], "truncated"),
    (lambda b: b + b"\0", "trailing"),
    (lambda b: b[:-5] + bytes([b[-5] ^ 1]) + b[-4:], "checksum mismatch"),
    (lambda b: b[:70] + b"X" + b[71:], "checksum mismatch"),
    (lambda b: b"NOTPEEL!" + b[8:], "not a peel package"),
    (lambda b: b[:8] + (99).to_bytes(4, "little") + b[12:], "version 99"),
    (lambda b: b[:10], "not a peel package"),
    (lambda b: b"", "not a peel package"),
])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_corruption_gives_a_clear_error(group: GroupArrays, tmp_path: Path, mutate: object,
                                        message: str, precision: str) -> None:
    path = tmp_path / "p.peel"
    build_package(path, group, 0.5, user=0, options=DeployOptions(precision=precision))
    bad = tmp_path / "bad.peel"
    bad.write_bytes(mutate(path.read_bytes()))  # type: ignore[operator]
    with pytest.raises(PackageError, match=message) as err:
        open_package(bad)
    assert str(bad) in str(err.value)


def test_missing_file_is_a_package_error(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="cannot read"):
        open_package(tmp_path / "nope.peel")


def test_read_package_from_bytes(group: GroupArrays, tmp_path: Path) -> None:
    build_package(tmp_path / "p.peel", group, 0.5, user=4)
    pkg = read_package((tmp_path / "p.peel").read_bytes(), "in-memory")
    assert pkg.rank(k=5).items.size == 5


def test_check_group_arrays_names_the_problem(group: GroupArrays) -> None:
    cases = [
        (dict(blocks=group.blocks[:, :, 0]), "blocks must be"),
        (dict(blocks=np.where(group.blocks > 0.9, np.nan, group.blocks)), "NaN"),
        (dict(alpha=group.alpha[:, :3]), "alpha has 3 blocks"),
        (dict(alpha=-group.alpha), "non-negative"),
        (dict(item_group=group.item_group + 1), r"\[0, 6\)"),
        (dict(item_group=group.item_group[:5]), "one per item"),
        (dict(user_emb=group.user_emb[:, :3]), "user_emb must be"),
    ]
    base = dict(blocks=group.blocks, alpha=group.alpha, item_group=group.item_group,
                users=group.users, user_emb=group.user_emb)
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            check_group_arrays(**{**base, **change}, source="x.npz")


# --------------------------------------------------------------------------- run folders + CLI


def _write_run(root: Path, groups: list[GroupArrays]) -> Path:
    (root / "groups").mkdir(parents=True)
    for g, arrays in enumerate(groups):
        np.savez(root / "groups" / f"group_{g:03d}.npz", blocks=arrays.blocks,
                 alpha=arrays.alpha, item_group=arrays.item_group, users=arrays.users,
                 user_emb=arrays.user_emb)
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    a = synthetic_group(n_items=500, n_blocks=8, block_dim=4, n_item_groups=5, n_users=4, seed=1)
    b = synthetic_group(n_items=500, n_blocks=8, block_dim=4, n_item_groups=5, n_users=4, seed=2)
    b = GroupArrays(b.blocks, b.alpha, b.item_group, b.users + 100, b.user_emb)
    return _write_run(tmp_path_factory.mktemp("run"), [a, b])


def test_run_folder_lookup(run_dir: Path) -> None:
    assert find_user_group(run_dir, 102) == 1
    assert load_group(run_dir, 1).user_row(102) == 2
    with pytest.raises(ValueError, match="no group"):
        find_user_group(run_dir, 55)
    with pytest.raises(ValueError, match=r"groups 0\.\.1"):
        load_group(run_dir, 7)


def test_bad_group_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "groups").mkdir()
    np.savez(tmp_path / "groups" / "group_000.npz", blocks=np.array([object()]), alpha=[1],
             item_group=[0], users=[0], user_emb=[0])
    with pytest.raises(ValueError, match=r"group_000\.npz"):
        load_group(tmp_path, 0)
    (tmp_path / "groups" / "group_001.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"not a readable \.npz"):
        load_group(tmp_path, 1)
    np.savez(tmp_path / "groups" / "group_002.npz", blocks=np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="missing array"):
        load_group(tmp_path, 2)


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="peel")
    cli_device.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_deploy_recommend_shrink(run_dir: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    pkg = tmp_path / "u102.peel"
    code, out, _ = _cli(["deploy", str(run_dir), "--budget", "0.5", "--user", "102", "--out",
                         str(pkg), "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["group"] == 1 and info["user"] == 102
    assert info["report"]["total"] <= info["report"]["budget"] == full_table_bytes(500, 32) // 2

    code, out, _ = _cli(["recommend", str(pkg), "--k", "7", "--exclude", "1,2,3", "--json"],
                        capsys)
    assert code == 0
    ranked = json.loads(out)
    direct = open_package(pkg).rank(k=7, exclude=[1, 2, 3])
    assert ranked["items"] == direct.items.tolist()
    assert not {1, 2, 3} & set(ranked["items"])

    small = tmp_path / "small.peel"
    code, out, _ = _cli(["shrink", str(pkg), "--budget", "0.2", "--out", str(small)], capsys)
    assert code == 0 and "blocks kept" in out
    code, out, _ = _cli(["recommend", str(pkg), "--budget", "0.2", "--k", "5", "--json"], capsys)
    assert json.loads(out)["items"] == open_package(small).rank(k=5).items.tolist()

    code, out, _ = _cli(["recommend", str(small), "--k", "3"], capsys)
    assert code == 0 and "rank" in out and len(out.strip().splitlines()) == 5

    group_pkg = tmp_path / "g0.peel"
    code, out, _ = _cli(["deploy", str(run_dir), "--budget", "20KB", "--group", "0", "--out",
                         str(group_pkg), "--selection", "random", "--seed", "5",
                         "--similarity", "literal", "--weighting", "alpha", "--scale", "eq10"],
                        capsys)
    assert code == 0 and "group 0" in out and "scale eq10" in out
    spec = open_package(group_pkg).spec
    assert (spec.selection, spec.seed, spec.similarity, spec.weighting, spec.scale) == (
        "random", 5, "literal", "alpha", "eq10")


@pytest.mark.parametrize(("argv", "message"), [
    (["deploy", "{run}", "--budget", "5XB", "--group", "0", "--out", "{tmp}/x"], "5XB"),
    (["deploy", "{run}", "--budget", "100", "--group", "0", "--out", "{tmp}/x"], "minimum"),
    (["deploy", "{tmp}/none", "--budget", "1MB", "--group", "0", "--out", "{tmp}/x"],
     "no such folder"),
    (["deploy", "{run}", "--budget", "1MB", "--user", "77", "--out", "{tmp}/x"], "user 77"),
    (["recommend", "{tmp}/missing.peel"], "cannot read"),
    (["recommend", "{tmp}/group.peel"], "--user"),
    (["recommend", "{tmp}/user.peel", "--exclude", "a,b"], "--exclude"),
    (["recommend", "{tmp}/user.peel", "--exclude", "99999"], "outside"),
    (["recommend", "{tmp}/user.peel", "--budget", "1GB"], "cannot grow"),
    (["shrink", "{tmp}/user.peel", "--budget", "10", "--out", "{tmp}/y"], "minimum"),
    (["shrink", "{tmp}/corrupt.peel", "--budget", "10KB", "--out", "{tmp}/y"], "checksum"),
])
def test_cli_errors_are_clean(run_dir: Path, tmp_path: Path, argv: list[str], message: str,
                              capsys: pytest.CaptureFixture[str]) -> None:
    build_package(tmp_path / "group.peel", load_group(run_dir, 0), 0.5)
    build_package(tmp_path / "user.peel", load_group(run_dir, 0), 0.2, user=1)  # not all
    data = bytearray((tmp_path / "user.peel").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "corrupt.peel").write_bytes(bytes(data))
    argv = [a.format(run=run_dir, tmp=tmp_path) for a in argv]
    code, out, err = _cli(argv, capsys)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@settings(max_examples=25, deadline=None)
@given(n_items=st.integers(1, 80), n_blocks=st.integers(1, 5), block_dim=st.integers(1, 4),
       n_groups=st.integers(1, 6), seed=st.integers(0, 1000), data=st.data())
def test_no_package_exceeds_its_budget(n_items: int, n_blocks: int, block_dim: int,
                                       n_groups: int, seed: int, data: st.DataObject) -> None:
    arrays = synthetic_group(n_items, n_blocks, block_dim, n_groups, 2, seed)
    budget = data.draw(st.integers(1, full_table_bytes(n_items, n_blocks * block_dim) + 4096))
    user = data.draw(st.sampled_from([None, 1]))
    options = DeployOptions(precision=data.draw(st.sampled_from(PRECISION_CHOICES)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.peel"
        try:
            report = build_package(path, arrays, budget, user=user, options=options)
        except BudgetError as err:
            assert "minimum" in str(err) and not path.exists()
            return
        pkg = open_package(path)
        assert report.total <= budget and path.stat().st_size == report.file_bytes
        assert all(s.size >= 1 for s in pkg.block_sets())  # every item group keeps a block
        assert pkg.report == report
        assert report.total / MB < budget / MB + 1e-12


def _resigned(raw: bytes) -> bytes:
    """``raw`` with a valid sha256 again, so a test reaches the checks past the digest."""
    digest = hashlib.sha256(raw[:32])
    digest.update(raw[64:])
    return raw[:32] + digest.digest() + raw[64:]


@pytest.mark.parametrize(("precision", "edit", "message"), [
    ("int8", lambda k, b: (k.__setitem__(0, 9), None), "unknown block kind"),
    ("int8", lambda k, b: (b.__setitem__(1, 0x80), None), "scales must be finite and non-neg"),
    ("int8o", lambda k, b: (b.__setitem__(slice(0, 2), b"\x00\x7c"), None), "finite"),
    ("fp16", lambda k, b: (b.__setitem__(slice(0, 2), b"\x00\x7e"), None), "float16 block"),
    ("int8s", lambda k, b: (b.__setitem__(slice(0, 4), b"\x00\x00\xc0\x7f"), None),
     "column scales must be finite"),
    # the synthetic group's int4r100 order: six blocks, three refinements, block (1, 7) at 9
    # and its refinement at 10
    ("int4r100", lambda k, b: (k.__setitem__(9, 5), None), "refinement without its 4-bit"),
    ("int4r100", lambda k, b: (k.__setitem__(9, 7), None), "selected twice"),
    ("int4r100", lambda k, b: (k.__setitem__(0, 7), None), "first block of each item group"),
])
def test_v4_content_checks(group: GroupArrays, tmp_path: Path, precision: str, edit: object,
                           message: str) -> None:
    build_package(tmp_path / "p.peel", group, 0.3, options=DeployOptions(precision=precision))
    raw = bytearray((tmp_path / "p.peel").read_bytes())
    header_len = int.from_bytes(raw[12:16], "little")
    arrays = json.loads(raw[64: 64 + header_len])["arrays"]
    start = 64 + -(-header_len // 64) * 64
    kinds = memoryview(raw)[start + arrays["kinds"]["offset"]:][: arrays["kinds"]["shape"][0]]
    blocks = memoryview(raw)[start + arrays["blocks"]["offset"]:]
    edit(kinds, blocks)  # type: ignore[operator]
    kinds.release()
    blocks.release()
    with pytest.raises(PackageError, match=message):
        read_package(_resigned(bytes(raw)), "edited.peel")


@pytest.mark.parametrize("bits", [b"\x00\x7e", b"\x00\xbc"])  # NaN, -1.0
def test_v6_row_scales_are_checked(group: GroupArrays, tmp_path: Path, bits: bytes) -> None:
    build_package(tmp_path / "p.peel", group, 0.3, options=DeployOptions(precision="int4s"))
    raw = bytearray((tmp_path / "p.peel").read_bytes())
    header_len = int.from_bytes(raw[12:16], "little")
    slot = json.loads(raw[64: 64 + header_len])["arrays"]["row_scale"]
    at = 64 + -(-header_len // 64) * 64 + slot["offset"] + 2 * 17  # item row 17
    raw[at: at + 2] = bits
    with pytest.raises(PackageError, match="row scales must be finite and non-negative"):
        read_package(_resigned(bytes(raw)), "edited.peel")
