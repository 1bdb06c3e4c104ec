"""User groups (K-Means, Eq. 3) and item groups (popularity segments) with their ablations."""

from __future__ import annotations

import numpy as np
import pytest

from peel.groups import (
    GroupConfig,
    describe_groups,
    group_sizes,
    make_item_groups,
    make_user_groups,
    relabel_by_first_member,
)


def _blobs(n_per: int = 40, k: int = 4, dim: int = 8, seed: int = 0) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10.0, size=(k, dim))
    truth = np.repeat(np.arange(k), n_per)
    perm = rng.permutation(len(truth))
    truth = truth[perm]
    return (centres[truth] + rng.normal(size=(len(truth), dim))).astype(np.float32), truth


def test_kmeans_recovers_separated_clusters_with_sizes() -> None:
    emb, truth = _blobs()
    groups = make_user_groups(emb, GroupConfig(n_user_groups=4), seed=0)
    assert groups.dtype == np.int64 and groups.shape == (len(emb),)
    assert group_sizes(groups, 4).tolist() == [40, 40, 40, 40]
    # every cluster is exactly one planted blob
    for g in range(4):
        assert len(np.unique(truth[groups == g])) == 1


def test_kmeans_is_deterministic_and_labels_ordered_by_first_member() -> None:
    emb, _ = _blobs(seed=1)
    cfg = GroupConfig(n_user_groups=4, kmeans_n_init=2)
    a = make_user_groups(emb, cfg, seed=3)
    b = make_user_groups(emb.astype(np.float64), cfg, seed=3)
    np.testing.assert_array_equal(a, b)
    _, first = np.unique(a, return_index=True)
    assert a[np.sort(first)].tolist() == [0, 1, 2, 3]
    assert a[0] == 0


def test_normalized_kmeans_clusters_directions() -> None:
    rng = np.random.default_rng(0)
    directions = np.repeat(np.eye(2), 30, axis=0) + rng.normal(scale=0.05, size=(60, 2))
    scale = np.r_[rng.uniform(0.1, 1, 15), rng.uniform(20, 30, 15)]
    emb = directions * np.r_[scale, scale][:, None]
    truth = np.repeat([0, 1], 30)
    raw = make_user_groups(emb, GroupConfig(n_user_groups=2), seed=0)
    by_dir = make_user_groups(emb, GroupConfig(n_user_groups=2, normalize=True), seed=0)
    assert not all(len(np.unique(truth[raw == g])) == 1 for g in range(2))
    assert all(len(np.unique(truth[by_dir == g])) == 1 for g in range(2))


def test_single_user_group_ablation() -> None:
    emb, _ = _blobs()
    groups = make_user_groups(emb, GroupConfig(user_grouping="single"), seed=0)
    assert (groups == 0).all()


def test_user_group_errors() -> None:
    with pytest.raises(ValueError, match="cannot make 15 user groups from 5 users"):
        make_user_groups(np.ones((5, 2)), GroupConfig(), seed=0)
    with pytest.raises(ValueError, match="NaN"):
        make_user_groups(np.full((20, 2), np.nan), GroupConfig(n_user_groups=2), seed=0)
    with pytest.raises(ValueError, match="user_grouping"):
        make_user_groups(np.ones((20, 2)), GroupConfig(user_grouping="spectral"), seed=0)
    with pytest.raises(ValueError, match="non-empty groups"):
        relabel_by_first_member(np.array([0, 0, 2]), 3)


def test_popularity_groups_are_equal_sized_and_ordered() -> None:
    rng = np.random.default_rng(0)
    pop = rng.zipf(1.5, size=103).astype(np.int64)
    cfg = GroupConfig(n_item_groups=10)
    groups = make_item_groups(pop, cfg, seed=0)
    sizes = group_sizes(groups, 10)
    assert sizes.sum() == 103 and sizes.max() - sizes.min() <= 1
    # group 0 holds the most popular items: every item of group g is at least as popular as
    # every item of group g + 1
    for g in range(9):
        assert pop[groups == g].min() >= pop[groups == g + 1].max()
    # ties are broken by item index, so the result is a pure function of the input
    np.testing.assert_array_equal(groups, make_item_groups(pop, cfg, seed=99))
    flat = make_item_groups(np.ones(20, dtype=np.int64), GroupConfig(n_item_groups=4), seed=0)
    assert flat.tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5


def test_random_item_groups_ablation() -> None:
    pop = np.arange(200)[::-1].copy()
    cfg = GroupConfig(n_item_groups=20, item_grouping="random")
    a = make_item_groups(pop, cfg, seed=1)
    assert group_sizes(a, 20).tolist() == [10] * 20
    np.testing.assert_array_equal(a, make_item_groups(pop, cfg, seed=1))
    assert not np.array_equal(a, make_item_groups(pop, cfg, seed=2))
    assert not np.array_equal(a, make_item_groups(pop, GroupConfig(n_item_groups=20), seed=1))


def test_item_group_errors_and_description() -> None:
    with pytest.raises(ValueError, match="cannot make 20 item groups from 5 items"):
        make_item_groups(np.ones(5), GroupConfig(), seed=0)
    with pytest.raises(ValueError, match="item_grouping"):
        make_item_groups(np.ones(50), GroupConfig(item_grouping="kmeans"), seed=0)
    desc = describe_groups(np.array([0, 1, 1]), np.array([0, 0, 1, 1]), np.array([5, 3, 1, 0]))
    assert desc == {"user_group_sizes": [1, 2], "item_group_sizes": [2, 2],
                    "item_group_interactions": [8, 1]}
