"""Data layer: readers, id maps, cleaning, k-core, split, cache and error messages."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peel.data import (
    DataConfig,
    DataError,
    from_interactions,
    gini,
    k_core,
    load_dataset,
    random_split,
)


def write(path, text):
    path.write_text(text)
    return path


def test_lightgcn_folder(tmp_path):
    write(tmp_path / "train.txt", "0 1 2 3\n1 2 3\n2 0 1\n")
    write(tmp_path / "valid.txt", "0 4\n")
    write(tmp_path / "test.txt", "0 0\n1 1 9\n5 1\n")
    data = load_dataset(tmp_path, cache_dir=False)
    assert data.n_users == 3  # user 5 has no training items: dropped from test, counted
    assert data.log["eval_rows_of_users_without_train"] == 1
    assert data.log["eval_rows_on_items_unseen_in_train"] == 2  # items 4 and 9
    assert data.train.nnz == 7 and data.valid.nnz == 1 and data.test.nnz == 3
    # ids are numeric and contiguous here, so index k is id k
    assert list(data.user_ids) == ["0", "1", "2"]
    assert list(data.item_ids[:4]) == ["0", "1", "2", "3"]


def test_lightgcn_bad_token_names_file_and_line(tmp_path):
    write(tmp_path / "train.txt", "0 1 2\n1 x 3\n")
    with pytest.raises(DataError, match=r"train.txt:2: non-integer id 'x'"):
        load_dataset(tmp_path, cache_dir=False)


def test_missing_train_file(tmp_path):
    write(tmp_path / "test.txt", "0 1\n")
    with pytest.raises(DataError, match=r"no train\.txt"):
        load_dataset(tmp_path, cache_dir=False)


def test_empty_file(tmp_path):
    f = write(tmp_path / "x.csv", "\n\n")
    with pytest.raises(DataError, match="empty"):
        load_dataset(f, cache_dir=False)


def test_csv_with_header_string_ids_duplicates_and_threshold(tmp_path):
    rows = ["user_id,item_id,rating,timestamp"]
    rng = np.random.default_rng(0)
    for u in range(20):
        for i in rng.choice(30, size=10, replace=False):
            rows.append(f"u{u},item-{i},{rng.integers(1, 6)},{rng.integers(1e9)}")
    rows.append(rows[1])  # one exact duplicate
    f = write(tmp_path / "ratings.csv", "\n".join(rows) + "\n")
    data = load_dataset(f, DataConfig(rating_threshold=3), cache_dir=False)
    assert data.log["duplicates"] == 1
    assert data.log["below_rating_threshold"] > 0
    assert all(uid.startswith("u") for uid in data.user_ids)
    total = data.train.nnz + data.valid.nnz + data.test.nnz
    assert total == 200 + 1 - data.log["duplicates"] - data.log["below_rating_threshold"]


def test_delimited_without_header_and_double_colon(tmp_path):
    f = write(tmp_path / "ratings.dat", "1::10::5::978300760\n1::11::3::978302109\n"
              "2::10::4::978301968\n")
    data = load_dataset(f, cache_dir=False)
    assert data.n_users == 2 and data.n_items == 2


def test_whitespace_and_tab(tmp_path):
    f = write(tmp_path / "a.tsv", "a\tx\na\ty\nb\tx\n")
    assert load_dataset(f, cache_dir=False).n_users == 2
    g = write(tmp_path / "b.txt", "a x\na y\nb x\n")
    assert load_dataset(g, cache_dir=False).n_items == 2


def test_unknown_column_message(tmp_path):
    f = write(tmp_path / "bad.csv", "user,thing\n1,2\n")
    with pytest.raises(DataError, match=r"bad.csv:1: unknown column 'thing'.*--columns"):
        load_dataset(f, cache_dir=False)


def test_short_row_message(tmp_path):
    f = write(tmp_path / "bad.csv", "user,item,rating\n1,2,3\n4,5\n")
    with pytest.raises(DataError, match=r"bad.csv:3: expected 3 columns"):
        load_dataset(f, cache_dir=False)


def test_bad_rating_message(tmp_path):
    f = write(tmp_path / "bad.csv", "user,item,rating\n1,2,good\n")
    with pytest.raises(DataError, match=r"bad.csv:2: rating 'good' is not a number"):
        load_dataset(f, cache_dir=False)


def test_threshold_without_rating_column(tmp_path):
    f = write(tmp_path / "a.csv", "user,item\n1,2\n")
    with pytest.raises(DataError, match="no rating column"):
        load_dataset(f, DataConfig(rating_threshold=1), cache_dir=False)


def test_parquet_roundtrip(tmp_path):
    # pyarrow is in the dev extra: a missing one is a failure here, never a silent skip
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"user": ["a", "a", "b", "c"], "item": [1, 2, 1, 3]})
    pq.write_table(table, tmp_path / "x.parquet")
    data = load_dataset(tmp_path / "x.parquet", cache_dir=False)
    assert data.n_users == 3 and data.n_items == 3


def test_cache_roundtrip_and_key_changes_with_content(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    write(folder / "train.txt", "0 1 2\n1 2\n")
    write(folder / "test.txt", "0 0\n")
    cache = tmp_path / "cache"
    a = load_dataset(folder, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1
    b = load_dataset(folder, cache_dir=cache)
    assert (a.train != b.train).nnz == 0 and list(a.item_ids) == list(b.item_ids)
    assert b.log == a.log
    write(folder / "train.txt", "0 1 2\n1 2 0\n")
    c = load_dataset(folder, cache_dir=cache)
    assert c.train.nnz == 4 and len(list(cache.glob("*.npz"))) == 2
    # caches are plain npz: loadable without pickle
    for f in cache.glob("*.npz"):
        np.load(f, allow_pickle=False).files  # noqa: B018


def test_k_core_is_a_fixed_point():
    rng = np.random.default_rng(1)
    u = rng.integers(0, 50, 600)
    i = rng.integers(0, 40, 600)
    keep = k_core(u, i, 50, 40, 5, 4)
    uc = np.bincount(u[keep], minlength=50)
    ic = np.bincount(i[keep], minlength=40)
    assert ((uc == 0) | (uc >= 5)).all() and ((ic == 0) | (ic >= 4)).all()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(0, 10**6))
def test_random_split_ratios_per_user(counts, seed):
    u = np.repeat(np.arange(len(counts)), counts)
    part = random_split(u, (0.7, 0.1, 0.2), seed)
    for user, n in enumerate(counts):
        p = part[u == user]
        n_train = (p == 0).sum()
        assert n_train >= 1
        assert n_train == max(round(n * 0.7), 1) or n_train == max(int(np.rint(n * 0.7)), 1)
        assert (p == 2).sum() == n - max(int(np.rint(n * 0.8)), n_train)
    # deterministic for a seed
    assert (random_split(u, (0.7, 0.1, 0.2), seed) == part).all()


def test_from_interactions_split_is_disjoint():
    rng = np.random.default_rng(3)
    users = rng.integers(0, 30, 800)
    items = rng.integers(0, 60, 800)
    data = from_interactions(users, items, DataConfig(seed=5))
    overlap = data.train.multiply(data.test).nnz + data.train.multiply(data.valid).nnz
    assert overlap == 0


def test_stats_fields():
    data = from_interactions([0, 0, 1, 1, 2], [0, 1, 0, 2, 0])
    s = data.stats()
    for key in ("users", "items", "interactions", "density", "train", "valid", "test",
                "popularity_gini", "top20pct_items_share"):
        assert key in s
    assert 0 <= s["popularity_gini"] <= 1


def test_gini_extremes():
    assert gini(np.ones(10)) == pytest.approx(0.0)
    assert gini(np.array([0] * 99 + [1])) == pytest.approx(0.99)
