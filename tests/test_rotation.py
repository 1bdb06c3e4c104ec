"""The SVD rotation keeps every score and orders dimensions by score energy."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peel.rotation import svd_rotate


def _tables(seed: int, n_users: int = 60, n_items: int = 80, dim: int = 12):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n_users, dim)), rng.normal(size=(n_items, dim))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_scores_are_preserved(seed: int) -> None:
    u, v = _tables(seed)
    rot = svd_rotate(u, v)
    np.testing.assert_allclose(rot.user_emb @ rot.item_emb.T, u @ v.T, atol=1e-4)


def test_truncation_is_the_best_low_rank_approximation() -> None:
    u, v = _tables(1)
    rot = svd_rotate(u, v)
    s = u @ v.T
    ref = np.linalg.svd(s, compute_uv=False)
    np.testing.assert_allclose(rot.singular_values, ref[:12], rtol=1e-8)
    assert np.all(np.diff(rot.singular_values) <= 0)
    for r in (1, 4, 11):
        ur, vr = rot.truncate(r)
        err = np.linalg.norm(s - ur @ vr.T) ** 2
        # Eckart-Young: the squared error is the sum of the dropped squared singular values.
        assert err == pytest.approx((ref[r:] ** 2).sum(), rel=1e-4)
    assert rot.energy()[-1] == pytest.approx(1.0)


def test_rotation_is_deterministic_and_checks_shapes() -> None:
    u, v = _tables(2)
    a, b = svd_rotate(u, v), svd_rotate(u.copy(), v.copy())
    assert np.array_equal(a.item_emb, b.item_emb)
    with pytest.raises(ValueError, match="equal widths"):
        svd_rotate(u, v[:, :5])
    with pytest.raises(ValueError, match="at least"):
        svd_rotate(u[:0], v)
    with pytest.raises(ValueError, match="dim must be"):
        a.truncate(0)


def test_fewer_users_than_dimensions_pads_with_zero_columns() -> None:
    u, v = _tables(3)
    rot = svd_rotate(u[:5], v)
    assert rot.user_emb.shape == (5, 12) and rot.item_emb.shape == (80, 12)
    np.testing.assert_allclose(rot.user_emb @ rot.item_emb.T, u[:5] @ v.T, atol=1e-4)
    assert np.all(rot.singular_values[5:] == 0)
    assert np.all(rot.item_emb[:, 5:] == 0)
