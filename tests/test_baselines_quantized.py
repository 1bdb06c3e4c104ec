"""lightgcn-fp16 / lightgcn-int8: the largest quantised table that fits, to the byte."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peel.baselines import REGISTRY, LightGCNFP16, LightGCNInt4, LightGCNInt8, make_baseline
from peel.baselines.lightgcn_quantized import quantized_bytes, quantized_dim
from peel.budget import KIND_F16, KIND_I4, KIND_I8, full_table_bytes
from peel.data import DataConfig, InteractionData, from_interactions
from peel.pretrain import PretrainConfig
from peel.quantize import encode

SMALL = PretrainConfig(dim=64, block_dim=8, layers=1, epochs=2, batch_size=1024, lr=2e-2,
                       patience=3, sampling="uniform", lr_half_life=0, diversity=0.0, seed=3)


def planted(n_users: int = 120, n_items: int = 60) -> InteractionData:
    """Three communities of users, each drawing from its own third of the items."""
    rng = np.random.default_rng(0)
    pools = np.array_split(rng.permutation(n_items), 3)
    pairs = {(u, int(i)) for u in range(n_users)
             for i in rng.choice(pools[u % 3], 10, replace=False)}
    users, items = zip(*sorted(pairs), strict=True)
    return from_interactions(list(users), list(items), DataConfig(seed=0), name="planted")


@settings(max_examples=200, deadline=None)
@given(n_items=st.integers(1, 5000), budget=st.integers(1, 10**7),
       kind=st.sampled_from([KIND_F16, KIND_I8, KIND_I4]), cap=st.integers(1, 256))
def test_the_largest_fitting_dimension_to_the_byte(n_items: int, budget: int, kind: int,
                                                   cap: int) -> None:
    if quantized_bytes(1, n_items, kind) > budget:
        with pytest.raises(ValueError, match="cannot hold"):
            quantized_dim(budget, n_items, kind, cap)
        return
    dim = quantized_dim(budget, n_items, kind, cap)
    assert 1 <= dim <= cap and quantized_bytes(dim, n_items, kind) <= budget
    assert dim == cap or quantized_bytes(dim + 1, n_items, kind) > budget


def test_byte_formulas_and_ml1m_dimensions() -> None:
    assert quantized_bytes(10, 100, KIND_F16) == 100 * 10 * 2 + 10 * 4
    assert quantized_bytes(10, 100, KIND_I8) == 100 * (10 + 2) + 10 * 4
    assert quantized_bytes(11, 100, KIND_I4) == 100 * (6 + 2) + 11 * 4  # two codes a byte
    full = full_table_bytes(3628, 128)  # ml-1m's 3,628 items at the paper's budgets
    dims = {frac: (quantized_dim(int(frac * full), 3628, KIND_F16, 128),
                   quantized_dim(int(frac * full), 3628, KIND_I8, 128))
            for frac in (0.107, 0.213, 0.533)}
    assert dims == {0.107: (27, 52), 0.213: (54, 106), 0.533: (128, 128)}


@pytest.mark.parametrize("cls", [LightGCNFP16, LightGCNInt8, LightGCNInt4])
def test_fit_stores_what_it_counts(cls: type) -> None:
    data = planted()
    cfg = SMALL
    # D' below the cap (4-bit rows cost about an eighth of float32 ones)
    budget = full_table_bytes(data.n_items, 64) // (12 if cls is LightGCNInt4 else 5)
    model = cls(cfg).fit(data, budget)
    dim = model.params["dim"]
    assert model.bytes_used == quantized_bytes(dim, data.n_items, cls.kind) <= budget
    assert quantized_bytes(dim + 1, data.n_items, cls.kind) > budget
    assert model.item_emb.shape == (data.n_items, dim) and dim < 64
    # the table is exactly what the stored form decodes to: re-encoding changes nothing
    again = encode(model.item_emb, cls.kind).decoded
    np.testing.assert_array_equal(again.astype(np.float32), model.item_emb)
    assert 0 < model.params["table_error"] < (0.2 if cls is LightGCNInt4 else 0.05)
    capped = cls(cfg).fit(data, 10 * full_table_bytes(data.n_items, 64))
    assert capped.params["dim"] == 64  # never wider than the full model


def test_quantised_variants_share_one_training_per_dimension() -> None:
    data = planted()
    cfg = PretrainConfig(**{**SMALL.__dict__, "dim": 16, "block_dim": 16})
    cache: dict = {}
    budget = full_table_bytes(data.n_items, 16) * 10  # both capped at 16 dims
    fp16 = make_baseline("lightgcn-fp16", cfg, trained=cache).fit(data, budget)
    int8 = make_baseline("lightgcn-int8", cfg, trained=cache).fit(data, budget)
    assert len(cache) == 1 and fp16.params["train_seconds"] == int8.params["train_seconds"]
    np.testing.assert_array_equal(fp16.user_emb, int8.user_emb)
    assert fp16.label == "LightGCN-fp16" and int8.label == "LightGCN-int8"


@pytest.mark.parametrize("name", ["lightgcn-fp16", "lightgcn-int8", "lightgcn-int4"])
def test_full_size_from_a_run_is_its_stage1_quantised(name: str, tmp_path) -> None:
    """At D' = dim a model made from a run stores that run's stage 1 (no training); below it,
    it trains as before."""
    from peel.pretrain import pretrain, save_result

    data = planted()
    cfg = PretrainConfig(**{**SMALL.__dict__, "dim": 16, "block_dim": 16})
    stage1 = pretrain(data, cfg, progress=False)
    save_result(stage1, tmp_path / "pretrain")
    cls = REGISTRY[name]
    full = make_baseline(name, cfg, run=tmp_path).fit(data, 10 * full_table_bytes(
        data.n_items, 16))
    assert full.params["same_model_as"] == "pretrained" and full.params["train_seconds"] == 0
    np.testing.assert_array_equal(full.user_emb, stage1.user_emb)
    np.testing.assert_array_equal(full.item_emb,
                                  encode(stage1.item_emb, cls.kind).decoded.astype(np.float32))
    small = make_baseline(name, cfg, run=tmp_path).fit(data, full_table_bytes(data.n_items, 16)
                                                       // (12 if cls.kind == KIND_I4 else 5))
    assert small.params["dim"] < 16 and "same_model_as" not in small.params


def test_search_space_names_pretrain_fields() -> None:
    fields = set(PretrainConfig.__dataclass_fields__)
    for name in ("lightgcn-fp16", "lightgcn-int8"):
        space = REGISTRY[name].search_space
        assert space and set(space) <= fields
        assert all(isinstance(v, tuple) and v for v in space.values())


def test_float_lightgcn_shares_the_training_of_the_same_dimension() -> None:
    """LightGCN at D' (fp32) and LightGCN-fp16 at the budget that buys the same D' are one
    model; with a shared cache it is trained once, and equals an uncached training."""
    data = planted()
    cfg = PretrainConfig(**{**SMALL.__dict__, "dim": 16, "block_dim": 16})
    fp32_budget = full_table_bytes(data.n_items, 8) + 8 * 4  # (|V| + 1) * 8 * 4: D' = 8
    fp16_budget = quantized_bytes(8, data.n_items, KIND_F16)  # D' = 8 at float16
    cache: dict = {}
    fp32 = make_baseline("lightgcn", cfg, trained=cache).fit(data, fp32_budget)
    fp16 = make_baseline("lightgcn-fp16", cfg, trained=cache).fit(data, fp16_budget)
    assert fp32.params["dim"] == fp16.params["dim"] == 8 and len(cache) == 1
    fresh = make_baseline("lightgcn", cfg).fit(data, fp32_budget)
    np.testing.assert_array_equal(fresh.item_emb, fp32.item_emb)
    np.testing.assert_array_equal(fp16.user_emb, fp32.user_emb)
    assert not np.array_equal(fp16.item_emb, fp32.item_emb)  # stored at float16


def test_svd_fp16_keeps_twice_the_directions_at_float16_to_the_byte() -> None:
    """lightgcn-svd-fp16 is lightgcn-svd's rotation truncated at the float16 D' (about twice
    the float32 D'), its item table rounded to float16, and its bytes the float16 formula."""
    from peel.baselines import LightGCNSVD, LightGCNSVDFP16

    rng = np.random.default_rng(1)
    data = planted()
    user, item = rng.normal(size=(data.n_users, 32)), rng.normal(size=(data.n_items, 32))
    budget = full_table_bytes(data.n_items, 8)  # float32 D' = 7, float16 D' = 15
    svd = LightGCNSVD.from_embeddings(user, item, SMALL).fit(data, budget)
    half = LightGCNSVDFP16.from_embeddings(user, item, SMALL).fit(data, budget)
    dim = half.params["dim"]
    assert dim == quantized_dim(budget, data.n_items, KIND_F16, 32) > 2 * svd.params["dim"]
    assert half.bytes_used == quantized_bytes(dim, data.n_items, KIND_F16) <= budget
    full = LightGCNSVD.from_embeddings(user, item, SMALL).fit(data, 10 * budget)
    np.testing.assert_allclose(half.item_emb, full.item_emb[:, :dim], rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(half.item_emb,
                                  encode(full.item_emb[:, :dim], KIND_F16).decoded)
    assert half.params["precision"] == "fp16" and REGISTRY["lightgcn-svd-fp16"] is LightGCNSVDFP16
    from peel.baselines import LightGCNSVDInt8

    quarter = LightGCNSVDInt8.from_embeddings(user, item, SMALL).fit(data, budget)
    dim8 = quarter.params["dim"]
    assert dim8 == quantized_dim(budget, data.n_items, KIND_I8, 32) > dim
    assert quarter.bytes_used == quantized_bytes(dim8, data.n_items, KIND_I8) <= budget
    np.testing.assert_array_equal(quarter.item_emb,
                                  encode(full.item_emb[:, :dim8], KIND_I8).decoded)
