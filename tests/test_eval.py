"""Evaluation equals a brute-force per-user implementation, and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peel.data import from_splits
from peel.eval import dot_scorer, evaluate, hit_matrix, metrics_from_topk


def brute_force(scores: np.ndarray, train: sp.csr_matrix, valid: sp.csr_matrix,
                test: sp.csr_matrix, k: int) -> dict[str, float]:
    """Textbook per-user loop: rank unseen items, recall = hits/|test|, NDCG with ideal DCG
    over min(|test|, k) positions."""
    recalls, ndcgs = [], []
    for u in range(scores.shape[0]):
        truth = set(test[u].indices.tolist())
        if not truth:
            continue
        seen = set(train[u].indices.tolist()) | set(valid[u].indices.tolist())
        candidates = [i for i in range(scores.shape[1]) if i not in seen]
        # stable order: by score desc, ties by index asc (what torch.topk returns for distinct)
        ranked = sorted(candidates, key=lambda i: (-scores[u, i], i))[:k]
        hits = [1.0 if i in truth else 0.0 for i in ranked]
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        idcg = sum(1 / math.log2(r + 2) for r in range(min(len(truth), k)))
        recalls.append(sum(hits) / len(truth))
        ndcgs.append(dcg / idcg)
    return {f"recall@{k}": float(np.mean(recalls)), f"ndcg@{k}": float(np.mean(ndcgs))}


@st.composite
def random_problem(draw):
    n_users = draw(st.integers(2, 12))
    n_items = draw(st.integers(8, 30))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    split = rng.choice(4, size=(n_users, n_items), p=[0.6, 0.15, 0.05, 0.2])
    train = sp.csr_matrix((split == 1).astype(np.float32))
    valid = sp.csr_matrix((split == 2).astype(np.float32))
    test = sp.csr_matrix((split == 3).astype(np.float32))
    # distinct scores so the ranking is unique
    scores = rng.permutation(n_users * n_items).reshape(n_users, n_items).astype(np.float32)
    k = draw(st.integers(1, n_items))
    return scores, train, valid, test, k


@settings(max_examples=60, deadline=None)
@given(random_problem())
def test_matches_brute_force(problem):
    scores, train, valid, test, k = problem
    data = from_splits(train, valid, test)
    if test.nnz == 0:
        return
    result = evaluate(lambda users: scores[users], data, "test", ks=(k,), batch_size=3)
    expected = brute_force(scores, train, valid, test, k)
    for key, value in expected.items():
        assert math.isclose(result[key], value, rel_tol=1e-9, abs_tol=1e-12), key


def test_hand_computed_case():
    # one user, 5 items; train has item 0; test has items 3 and 4
    train = sp.csr_matrix(np.array([[1, 0, 0, 0, 0]], dtype=np.float32))
    valid = sp.csr_matrix((1, 5), dtype=np.float32)
    test = sp.csr_matrix(np.array([[0, 0, 0, 1, 1]], dtype=np.float32))
    scores = np.array([[9.0, 1.0, 5.0, 4.0, 0.5]], dtype=np.float32)
    data = from_splits(train, valid, test)
    res = evaluate(lambda u: scores[u], data, "test", ks=(2, 3))
    # ranking without item 0: 2, 3, 1, 4 -> top2 = [2, 3] one hit at rank 2
    assert math.isclose(res["recall@2"], 0.5)
    idcg2 = 1 + 1 / math.log2(3)
    assert math.isclose(res["ndcg@2"], (1 / math.log2(3)) / idcg2)
    # top3 = [2, 3, 1]: still one hit; ideal over min(2, 3) = 2 positions
    assert math.isclose(res["recall@3"], 0.5)
    assert math.isclose(res["ndcg@3"], (1 / math.log2(3)) / idcg2)


def test_seen_items_are_excluded_and_valid_excluded_on_test():
    train = sp.csr_matrix(np.array([[1, 0, 0, 0]], dtype=np.float32))
    valid = sp.csr_matrix(np.array([[0, 1, 0, 0]], dtype=np.float32))
    test = sp.csr_matrix(np.array([[0, 0, 0, 1]], dtype=np.float32))
    scores = np.array([[10.0, 9.0, 1.0, 2.0]], dtype=np.float32)
    data = from_splits(train, valid, test)
    # train and valid items outrank the test item but must be skipped: test item is first
    res = evaluate(lambda u: scores[u], data, "test", ks=(1,))
    assert res["recall@1"] == 1.0
    # when evaluating on valid only train is excluded: valid item 1 is first
    res_valid = evaluate(lambda u: scores[u], data, "valid", ks=(1,))
    assert res_valid["recall@1"] == 1.0


def test_users_without_truth_are_not_averaged():
    train = sp.csr_matrix(np.array([[1, 0, 0], [1, 0, 0]], dtype=np.float32))
    valid = sp.csr_matrix((2, 3), dtype=np.float32)
    test = sp.csr_matrix(np.array([[0, 1, 0], [0, 0, 0]], dtype=np.float32))
    data = from_splits(train, valid, test)
    scores = np.array([[0, 5, 1], [0, 0, 0]], dtype=np.float32)
    res = evaluate(lambda u: scores[u], data, "test", ks=(1,))
    assert list(res.users) == [0]
    assert res["recall@1"] == 1.0
    assert res.per_user["recall@1"].shape == (1,)


def test_batching_and_dot_scorer_agree():
    rng = np.random.default_rng(0)
    n_users, n_items = 37, 50
    split = rng.choice(3, size=(n_users, n_items), p=[0.7, 0.2, 0.1])
    data = from_splits(sp.csr_matrix((split == 1).astype(np.float32)),
                       sp.csr_matrix((n_users, n_items), dtype=np.float32),
                       sp.csr_matrix((split == 2).astype(np.float32)))
    u = rng.standard_normal((n_users, 8)).astype(np.float32)
    v = rng.standard_normal((n_items, 8)).astype(np.float32)
    a = evaluate(dot_scorer(u, v), data, ks=(5, 10), batch_size=4)
    b = evaluate(lambda users: torch.from_numpy(u[users] @ v.T), data, ks=(5, 10),
                 batch_size=100)
    for key in a.metrics:
        assert math.isclose(a[key], b[key], rel_tol=1e-6)
        np.testing.assert_allclose(a.per_user[key], b.per_user[key], rtol=1e-6)


def test_metrics_from_topk_requires_truth():
    truth = sp.csr_matrix(np.array([[0, 1], [0, 0]], dtype=np.float32))
    topk = np.array([[1, 0], [0, 1]])
    try:
        metrics_from_topk(topk, np.array([0, 1]), truth, ks=(1,))
    except ValueError as err:
        assert "held-out" in str(err)
    else:
        raise AssertionError("expected ValueError")
    out = metrics_from_topk(topk[:1], np.array([0]), truth, ks=(1, 2))
    assert out["recall@1"][0] == 1.0 and out["ndcg@2"][0] == 1.0


def test_minus_one_padding_is_never_a_hit() -> None:
    """The runtime pads short lists with -1; naive keys made it the previous user's last item."""
    n_items = 5
    truth = sp.csr_matrix((np.ones(2), ([0, 1], [4, 0])), shape=(2, n_items))
    topk = np.array([[4, -1], [-1, -1]])  # user 1's -1 encodes as user 0's item 4
    hits = hit_matrix(topk, np.array([0, 1]), truth)
    assert hits.tolist() == [[True, False], [False, False]]
