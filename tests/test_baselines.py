"""Size arithmetic of the fixed-size baselines: the largest D' whose table fits the budget."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peel.baselines import FLOAT_BYTES, dims_for_budgets, fixed_size_bytes, fixed_size_dim


@given(budget=st.integers(0, 10**10), n_items=st.integers(1, 2 * 10**6))
def test_fixed_size_dim_is_the_largest_that_fits(budget: int, n_items: int) -> None:
    row = (n_items + 1) * FLOAT_BYTES  # one float32 per item, plus the user's vector
    if budget < row:
        with pytest.raises(ValueError, match="cannot hold even a 1-d item table"):
            fixed_size_dim(budget, n_items)
        return
    dim = fixed_size_dim(budget, n_items)
    assert dim >= 1
    assert fixed_size_bytes(dim, n_items) == (n_items + 1) * dim * 4 <= budget
    assert (n_items + 1) * (dim + 1) * 4 > budget  # one more dimension would not fit


def test_the_committed_sizes() -> None:
    # gowalla's 40,981 items at 10.7 / 21.3 / 53.3% of its 128-d table: 13 / 27 / 68 dims
    full = 40981 * 128 * 4
    budgets = [int(full * f) for f in (0.107, 0.213, 0.533)]
    assert dims_for_budgets(budgets, 40981).tolist() == [13, 27, 68]
