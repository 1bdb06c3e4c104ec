"""Budget parsing, block selection order and byte-exact accounting (peel.budget)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peel.budget import (
    MB,
    BudgetError,
    PackageSpec,
    block_bytes,
    check_alpha,
    fit,
    layout,
    minimum_budget,
    parse_budget,
    prefix_rows,
    prefix_sizes,
    selection_order,
)

FULL = 91_599 * 128 * 4


@pytest.mark.parametrize(("spec", "expected"), [
    ("5MB", 5_000_000),
    ("5 mb", 5_000_000),
    ("10MiB", 10 * 2**20),
    ("512KB", 512_000),
    ("1.5GB", 1_500_000_000),
    ("1.1MB", 1_100_000),
    ("100B", 100),
    ("12345", 12_345),
    (12_345, 12_345),
    (np.int64(7), 7),
    ("1", 1),
    (0.25, FULL // 4),
    ("0.25", FULL // 4),
    ("25%", FULL // 4),
    ("1.0", FULL),
    (1.0, FULL),
    (0.107, int(0.107 * FULL)),
])
def test_parse_budget_accepts_documented_forms(spec: object, expected: int) -> None:
    assert parse_budget(spec, FULL) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", ["", "abc", "5XB", "-5MB", "0", 0, -3, "0.0", 1.5, "150%",
                                  "5e6", "MB", True, None, [5],
                                  float("nan"), float("inf")])
def test_parse_budget_rejects_bad_input_naming_accepted_forms(spec: object) -> None:
    with pytest.raises(BudgetError) as err:
        parse_budget(spec, FULL)  # type: ignore[arg-type]
    assert "budget" in str(err.value)


def test_parse_budget_error_lists_accepted_forms() -> None:
    with pytest.raises(BudgetError, match=r"5MB.*10MiB.*fraction"):
        parse_budget("five megabytes", FULL)


def test_fraction_needs_table_size() -> None:
    with pytest.raises(BudgetError, match="fraction"):
        parse_budget("0.5")
    assert parse_budget("5MB") == 5 * MB  # absolute sizes do not need it


def test_check_alpha_rejects_invalid_weights() -> None:
    for bad in (np.array([1.0, 2.0]), np.array([[1.0, -1.0]]), np.array([[np.nan, 1.0]]),
                np.array([["a", "b"]])):
        with pytest.raises(ValueError, match="alpha"):
            check_alpha(bad)


def test_importance_order_ties_are_deterministic() -> None:
    """Equal weights: group order, then block order, with every group's block 0 first."""
    order = selection_order(np.ones((3, 4)))
    assert order[:3].tolist() == [[0, 0], [1, 0], [2, 0]]
    assert order[3:].tolist() == [[g, n] for g in range(3) for n in range(1, 4)]


def test_importance_order_follows_the_paper() -> None:
    alpha = np.array([[0.1, 0.5, 0.2],
                      [0.9, 0.05, 0.3],
                      [0.0, 0.0, 0.01]])
    order = selection_order(alpha).tolist()
    # phase 1: each group's best block, by weight; phase 2: the rest by weight
    assert order[:3] == [[1, 0], [0, 1], [2, 2]]
    assert order[3:] == [[1, 2], [0, 2], [0, 0], [1, 1], [2, 0], [2, 1]]


alphas = st.integers(1, 6).flatmap(lambda g: st.integers(1, 6).flatmap(
    lambda n: st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0, 2.0]), min_size=g * n,
                       max_size=g * n).map(lambda v: np.array(v).reshape(g, n))))


@settings(max_examples=60, deadline=None)
@given(alpha=alphas, mode=st.sampled_from(["importance", "random"]), seed=st.integers(0, 99))
def test_order_properties(alpha: np.ndarray, mode: str, seed: int) -> None:
    n_groups, n_blocks = alpha.shape
    order = selection_order(alpha, mode, seed)
    flat = order[:, 0] * n_blocks + order[:, 1]
    assert sorted(flat.tolist()) == list(range(n_groups * n_blocks))  # a permutation
    assert sorted(order[:n_groups, 0].tolist()) == list(range(n_groups))  # one per group
    assert np.array_equal(order, selection_order(alpha, mode, seed))  # reproducible
    if mode == "importance":
        weights = alpha[order[:, 0], order[:, 1]]
        assert np.all(np.diff(weights[:n_groups]) <= 0)
        assert np.all(np.diff(weights[n_groups:]) <= 0)
        assert np.array_equal(weights[:n_groups], alpha.max(axis=1)[order[:n_groups, 0]])


def test_random_order_depends_on_seed() -> None:
    alpha = np.ones((20, 16))
    a, b = selection_order(alpha, "random", 1), selection_order(alpha, "random", 2)
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError, match="seed"):
        selection_order(alpha, "random", -1)
    with pytest.raises(ValueError, match="importance, random"):
        selection_order(alpha, "best")


def _spec(counts: tuple[int, ...], n_blocks: int = 4, block_dim: int = 2,
          **kw: object) -> PackageSpec:
    return PackageSpec(n_items=sum(counts), n_blocks=n_blocks, block_dim=block_dim,
                       group_counts=counts, **kw)  # type: ignore[arg-type]


specs = st.builds(
    _spec,
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=5).map(tuple).filter(
        lambda c: sum(c) > 0),
    n_blocks=st.integers(1, 5),
    block_dim=st.integers(1, 4),
    user_stored=st.booleans(),
    n_seen=st.integers(0, 5),
    item_ids=st.booleans(),
    precision=st.sampled_from(["fp32", "fp32", "int8", "value", "int4", "int8s", "int4s",
                               "int4r50"]),
)


@settings(max_examples=150, deadline=None)
@given(spec=specs, data=st.data())
def test_fit_is_the_longest_prefix_within_budget(spec: PackageSpec, data: st.DataObject) -> None:
    alpha = np.asarray(data.draw(st.lists(st.floats(0, 1), min_size=spec.n_groups * spec.n_blocks,
                                          max_size=spec.n_groups * spec.n_blocks)))
    order = selection_order(alpha.reshape(spec.n_groups, spec.n_blocks))
    kinds = np.asarray(data.draw(st.lists(st.integers(0, len(spec.block_kinds) - 1),
                                          min_size=len(order), max_size=len(order))))
    rows = prefix_sizes(spec, order, kinds)
    minimum = minimum_budget(spec, order, kinds)
    full = layout(spec, len(order), int(rows[-1]), 0).report.total
    budget = data.draw(st.integers(minimum, full + 200))
    lay = fit(spec, order, budget, kinds=kinds)
    k = lay.n_selected
    assert lay.report.total <= budget
    if k < len(order):  # the next block would not fit
        assert layout(spec, k + 1, int(rows[k + 1]), budget).report.total > budget
    linear = max(j for j in range(spec.n_groups, len(order) + 1)
                 if layout(spec, j, int(rows[j]), budget).report.total <= budget)
    assert k == linear  # the longest fitting prefix, found without trying each
    smaller = data.draw(st.integers(minimum, budget))
    assert fit(spec, order, smaller, kinds=kinds).n_selected <= k  # prefix property
    # the report adds up to the file plus the user embedding left to the device
    reserved = 0 if spec.user_stored else spec.dim * 4
    assert lay.report.total == lay.file_bytes + reserved == lay.report.file_bytes + reserved
    if spec.mixed:
        shared = 2 * spec.n_items if spec.shared_scale else 0  # the row_scale array
        assert lay.report.item_blocks - shared == rows[k] == sum(
            block_bytes(int(kind), spec.block_dim, spec.group_counts[g])
            for (g, _), kind in zip(order[:k], kinds[:k], strict=True))
    else:
        assert lay.report.item_blocks == rows[k] * spec.block_dim * 4
        assert np.array_equal(rows, prefix_rows(spec, order))
    assert all(s.offset % 64 == 0 for s in lay.slots)


def test_minimum_budget_error_states_bytes_and_mb() -> None:
    spec = _spec((10, 10, 10))
    order = selection_order(np.ones((3, 4)))
    minimum = minimum_budget(spec, order)
    assert fit(spec, order, minimum).n_selected == 3
    with pytest.raises(BudgetError) as err:
        fit(spec, order, minimum - 1)
    message = str(err.value)
    assert f"{minimum:,} B" in message and f"{minimum / MB:.3f} MB" in message
    assert f"budget of {minimum} bytes or more" in message


def test_group_package_reserves_the_user_embedding() -> None:
    spec_group = _spec((5, 5), n_blocks=16, block_dim=8)
    spec_user = _spec((5, 5), n_blocks=16, block_dim=8, user_stored=True)
    a = layout(spec_group, 2, 10, 0).report
    b = layout(spec_user, 2, 10, 0).report
    assert a.user_embedding == b.user_embedding == 128 * 4
    assert a.file_bytes == a.total - 512
    assert b.file_bytes == b.total
