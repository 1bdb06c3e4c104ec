"""Stage 1: LightGCN/MF pretraining with the diversity regularizer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peel.eval import dot_scorer, evaluate
from peel.pretrain import (
    NegativeSampler,
    PretrainConfig,
    Propagator,
    _nested_bpr,
    block_pairwise_sq_distance,
    bpr_loss,
    load_embeddings,
    mean_block_distance,
    normalized_interactions,
    pretrain,
    save_result,
)
from peel.synthetic import SyntheticConfig, make_demo


@pytest.fixture(scope="module")
def small():
    return make_demo(SyntheticConfig(n_users=300, n_items=200, n_communities=4, n_topics=8,
                                     mean_interactions=25, seed=1))


def fast_cfg(**kw):
    base = dict(dim=32, block_dim=8, layers=2, epochs=6, batch_size=512, lr=0.01, diversity=0.0,
                patience=100, seed=7)
    base.update(kw)
    return PretrainConfig(**base)


def test_propagation_matches_dense_lightgcn():
    rng = np.random.default_rng(0)
    dense = (rng.random((6, 5)) < 0.4).astype(np.float32)
    dense[0, 0] = 1.0
    r = sp.csr_matrix(dense)
    n_u, n_i = r.shape
    adj = np.zeros((n_u + n_i, n_u + n_i), dtype=np.float64)
    adj[:n_u, n_u:] = r.toarray()
    adj[n_u:, :n_u] = r.toarray().T
    deg = adj.sum(1)
    inv = np.zeros_like(deg)
    inv[deg > 0] = deg[deg > 0] ** -0.5
    a_hat = inv[:, None] * adj * inv[None, :]
    e0 = rng.standard_normal((n_u + n_i, 4))
    layers = [e0]
    for _ in range(3):
        layers.append(a_hat @ layers[-1])
    expected_mean = np.mean(layers, axis=0)
    prop = Propagator(r, 3, "mean", torch.device("cpu"))
    u = torch.tensor(e0[:n_u], dtype=torch.float32)
    i = torch.tensor(e0[n_u:], dtype=torch.float32)
    pu, pi = prop(u, i)
    np.testing.assert_allclose(pu.numpy(), expected_mean[:n_u], atol=1e-5)
    np.testing.assert_allclose(pi.numpy(), expected_mean[n_u:], atol=1e-5)
    last = Propagator(r, 3, "last", torch.device("cpu"))
    _, li = last(u, i)
    np.testing.assert_allclose(li.numpy(), layers[-1][n_u:], atol=1e-5)
    np.testing.assert_allclose(normalized_interactions(r).toarray(), a_hat[:n_u, n_u:],
                               atol=1e-6)


def test_propagation_gradient_matches_autograd_dense():
    rng = np.random.default_rng(1)
    r = sp.csr_matrix((rng.random((5, 7)) < 0.5).astype(np.float32))
    prop = Propagator(r, 2, "mean", torch.device("cpu"))
    u = torch.randn(5, 3, requires_grad=True)
    i = torch.randn(7, 3, requires_grad=True)
    pu, pi = prop(u, i)
    (pu.sum() * 2 + (pi**2).sum()).backward()
    rd = torch.tensor(normalized_interactions(r).toarray())
    u2 = u.detach().clone().requires_grad_(True)
    i2 = i.detach().clone().requires_grad_(True)
    cu, ci, su, si = u2, i2, u2, i2
    for _ in range(2):
        cu, ci = rd @ ci, rd.T @ cu
        su, si = su + cu, si + ci
    ((su / 3).sum() * 2 + ((si / 3) ** 2).sum()).backward()
    np.testing.assert_allclose(u.grad.numpy(), u2.grad.numpy(), atol=1e-5)
    np.testing.assert_allclose(i.grad.numpy(), i2.grad.numpy(), atol=1e-5)


@pytest.mark.parametrize("normalized", [False, True])
def test_block_distance_equals_pairwise_sum(normalized):
    x = torch.randn(11, 24, dtype=torch.float64)
    blocks = [x[:, k * 6 : (k + 1) * 6] for k in range(4)]
    if normalized:
        blocks = [b / b.norm() for b in blocks]
    brute = np.mean([float(((a - b) ** 2).sum()) for a, b in itertools.combinations(blocks, 2)])
    assert float(block_pairwise_sq_distance(x, 4, normalized)) == pytest.approx(brute)


def test_negative_sampler_avoids_positives():
    r = sp.csr_matrix(np.array([[1, 1, 1, 0], [0, 1, 0, 0]], dtype=np.float32))
    sampler = NegativeSampler(r)
    rng = np.random.default_rng(0)
    neg = sampler.sample(np.array([0] * 50 + [1] * 50), 3, rng)
    assert (neg[:50] == 3).all()
    assert not (neg[50:] == 1).any()


def _reference_sample(sampler: NegativeSampler, users: np.ndarray, k: int,
                      rng: np.random.Generator) -> np.ndarray:
    """The sampler as first written: every entry re-tested by binary search each round."""
    u = np.repeat(users[:, None], k, axis=1)
    items = rng.integers(0, sampler.n_items, size=u.shape)
    for _ in range(5):
        q = u.astype(np.int64) * sampler.n_items + items
        pos = np.minimum(np.searchsorted(sampler.keys, q), len(sampler.keys) - 1)
        bad = sampler.keys[pos] == q
        if not bad.any():
            return items
        items[bad] = rng.integers(0, sampler.n_items, size=int(bad.sum()))
    sampler._fix_dense_users(u, items, rng)
    return items


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12), st.integers(2, 40), st.floats(0.0, 0.95), st.integers(0, 2**31))
def test_negative_sampler_membership_and_draws_match_binary_search(n_users, n_items, density,
                                                                  seed):
    """Bit matrix and binary search answer alike, and both draw the reference's negatives."""
    rng = np.random.default_rng(seed)
    dense = rng.random((n_users, n_items)) < density
    dense[:, 0] = False  # every user keeps at least one negative
    dense[0, 1] = True  # and there is a positive to avoid
    r = sp.csr_matrix(dense.astype(np.float32))
    bitset, search = NegativeSampler(r), NegativeSampler(r, bitset_limit=0)
    assert bitset.bits is not None and search.bits is None
    users = rng.integers(0, n_users, size=200)
    items = rng.integers(0, n_items, size=200)
    expect = dense[users, items]
    np.testing.assert_array_equal(bitset.is_positive(users, items), expect)
    np.testing.assert_array_equal(search.is_positive(users, items), expect)
    batch = rng.integers(0, n_users, size=64)
    ref = _reference_sample(search, batch, 5, np.random.default_rng(seed))
    for sampler in (bitset, search):
        got = sampler.sample(batch, 5, np.random.default_rng(seed))
        np.testing.assert_array_equal(got, ref)
        assert not dense[np.repeat(batch[:, None], 5, axis=1), got].any()


def test_training_is_deterministic_and_learns(small):
    a = pretrain(small, fast_cfg(), progress=False)
    b = pretrain(small, fast_cfg(), progress=False)
    np.testing.assert_array_equal(a.item_emb, b.item_emb)
    np.testing.assert_array_equal(a.user_emb, b.user_emb)
    learned = evaluate(dot_scorer(a.user_emb, a.item_emb), small, "test")["recall@20"]
    rng = np.random.default_rng(0)
    rand = evaluate(dot_scorer(rng.standard_normal(a.user_emb.shape),
                               rng.standard_normal(a.item_emb.shape)), small, "test")
    assert learned > 2 * rand["recall@20"]
    assert a.best_epoch >= 1 and a.history[-1]["valid"]["recall@20"] > 0


def test_nested_loss_is_the_mean_of_each_prefix_bpr_loss() -> None:
    gen = torch.Generator().manual_seed(0)
    eu, ip = torch.randn(7, 16, generator=gen), torch.randn(7, 16, generator=gen)
    inn = torch.randn(7, 3, 16, generator=gen)
    brute = [bpr_loss((eu[:, :k] * ip[:, :k]).sum(-1),
                      torch.einsum("bd,bkd->bk", eu[:, :k], inn[:, :, :k])) for k in (4, 8, 16)]
    got = _nested_bpr(eu, ip, inn, (4, 8))
    assert float(got) == pytest.approx(float(torch.stack(brute).mean()), rel=1e-5)


def test_nested_prefixes_are_trained_to_rank_on_their_own(small):
    """With a 4-d prefix loss, the first 4 dimensions alone order the training pairs better
    (lower BPR loss against fixed random negatives) than the first 4 of a model trained on the
    full embedding only, same seed and everything else."""
    tr = small.train.tocoo()
    neg = np.random.default_rng(0).integers(small.n_items, size=tr.nnz)

    def prefix_loss(res) -> float:
        u, i = res.user_emb[:, :4], res.item_emb[:, :4]
        margin = (u[tr.row] * i[tr.col]).sum(1) - (u[tr.row] * i[neg]).sum(1)
        return float(np.logaddexp(0, -margin).mean())

    kw = dict(layers=0, epochs=15, lr=0.05, sampling="uniform", lr_half_life=0)
    plain = pretrain(small, fast_cfg(**kw), progress=False)
    nested = pretrain(small, fast_cfg(nested_dims=(4,), **kw), progress=False)
    assert prefix_loss(nested) < prefix_loss(plain) - 0.02
    with pytest.raises(ValueError, match="nested_dims"):
        fast_cfg(nested_dims=(32,)).validate()


def test_resume_equals_uninterrupted(small, tmp_path):
    straight = pretrain(small, fast_cfg(epochs=4), progress=False)
    pretrain(small, fast_cfg(epochs=2), out_dir=tmp_path / "ck", progress=False)
    resumed = pretrain(small, fast_cfg(epochs=4), out_dir=tmp_path / "ck", progress=False)
    np.testing.assert_allclose(resumed.item_emb, straight.item_emb, rtol=1e-5, atol=1e-6)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]


def test_resume_refuses_different_config(small, tmp_path):
    pretrain(small, fast_cfg(epochs=1), out_dir=tmp_path / "ck", progress=False)
    with pytest.raises(ValueError, match="different config"):
        pretrain(small, fast_cfg(epochs=2, lr=0.5), out_dir=tmp_path / "ck", progress=False)


def test_mf_baseline_and_dns_run(small):
    """BPR-MF (0 layers) and DNS-trained LightGCN both learn the planted communities: each
    beats ranking by popularity by a wide margin (popularity ~0.36, random ~0.12 here)."""
    popular = np.asarray(small.item_popularity, dtype=np.float32)[:, None]
    pop = evaluate(dot_scorer(np.ones((small.n_users, 1), np.float32), popular), small,
                   "test")["recall@20"]
    mf = pretrain(small, fast_cfg(layers=0, epochs=5, lr=0.03, sampling="dns",
                                  dns_candidates=4), progress=False)
    dns = pretrain(small, fast_cfg(epochs=3, sampling="dns", dns_candidates=4), progress=False)
    for res in (mf, dns):
        assert np.isfinite(res.item_emb).all()
        recall = evaluate(dot_scorer(res.user_emb, res.item_emb), small, "test")["recall@20"]
        assert recall > pop + 0.1, (recall, pop)


def test_diversity_regularizer_diversifies_blocks_at_equal_quality(small):
    plain = pretrain(small, fast_cfg(epochs=10), progress=False)
    diverse = pretrain(small, fast_cfg(epochs=10, diversity=0.1), progress=False)
    d0 = mean_block_distance(plain.item_emb, 8)
    d1 = mean_block_distance(diverse.item_emb, 8)
    assert d1 > d0 * 1.05
    r0 = evaluate(dot_scorer(plain.user_emb, plain.item_emb), small, "valid")["recall@20"]
    r1 = evaluate(dot_scorer(diverse.user_emb, diverse.item_emb), small, "valid")["recall@20"]
    assert r1 >= 0.9 * r0


def test_literal_regularizer_stays_finite(small):
    res = pretrain(small, fast_cfg(epochs=5, diversity=0.1, diversity_mode="literal"),
                   progress=False)
    assert np.isfinite(res.item_emb).all()


def test_save_and_load_roundtrip(small, tmp_path):
    res = pretrain(small, fast_cfg(epochs=1), progress=False)
    save_result(res, tmp_path)
    u, i = load_embeddings(tmp_path)
    np.testing.assert_array_equal(u, res.user_emb)
    np.testing.assert_array_equal(i, res.item_emb)
    assert (tmp_path / "pretrain_log.json").exists()
    assert (tmp_path / "pretrain_config.json").exists()


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="multiple of block_dim"):
        PretrainConfig(dim=30, block_dim=8).validate()


def test_learning_rate_halves_every_half_life_and_zero_means_constant() -> None:
    from peel.pretrain import learning_rate

    cfg = PretrainConfig(lr=1e-2, lr_half_life=100)
    assert learning_rate(cfg, 0) == pytest.approx(1e-2)
    assert learning_rate(cfg, 100) == pytest.approx(5e-3)
    assert learning_rate(cfg, 300) == pytest.approx(1.25e-3)
    const = PretrainConfig(lr=1e-2, lr_half_life=0)
    assert learning_rate(const, 10_000) == pytest.approx(1e-2)
    with pytest.raises(ValueError, match="lr_half_life"):
        PretrainConfig(lr_half_life=-1).validate()
