"""The multi-dimensional baselines ESAPN and AutoEmb (issue 17): byte accounting, the device's
lifting, the budget gate and the demotion. The shared contract is in test_contract.py."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peel import device_multidim as dm
from peel.baselines import ESAPN, REGISTRY, AutoEmb, AutoEmbOptions, ESAPNOptions
from peel.baselines.autoemb import AutoEmbSearch, demote_to_fit
from peel.baselines.esapn import ESAPNSearch
from peel.budget import BudgetError, full_table_bytes
from peel.data import InteractionData
from peel.eval import metrics_from_topk
from peel.pretrain import PretrainConfig
from test_contract import SMALL_PRETRAIN, K, planted, popularity_recall

CFG = dataclasses.replace(SMALL_PRETRAIN, epochs=10)
SIZES16 = (2, 4, 8, 16)


@pytest.fixture(scope="module")
def data() -> InteractionData:
    return planted()


def test_candidate_sizes() -> None:
    assert dm.candidate_sizes(128) == (2, 4, 8, 16, 64, 128)
    assert dm.candidate_sizes(16) == SIZES16
    assert dm.candidate_sizes(32) == (2, 4, 8, 16, 32)
    assert dm.candidate_sizes(1) == (1,)
    with pytest.raises(ValueError):
        dm.candidate_sizes(0)


# --------------------------------------------------------------------------- byte accounting


def layout(counts: list[int], sizes: tuple[int, ...], method: str) -> dict[str, np.ndarray]:
    """Arrays shaped as the device stores them, built independently of the byte formulas."""
    dim = sizes[-1]
    rng = np.random.default_rng(0)
    codes = np.repeat(np.arange(len(sizes)), counts).astype(np.uint8)
    rng.shuffle(codes)
    arrays: dict[str, np.ndarray] = {"codes": codes}
    used = [k for k, c in enumerate(counts) if c]
    for k in used:
        arrays[f"table_{sizes[k]}"] = rng.normal(size=(counts[k], sizes[k])).astype(np.float32)
    if method == "esapn":
        for j in range(used[0], len(sizes) - 1):
            s, t = sizes[j], sizes[j + 1]
            arrays[f"chain_w_{s}"] = rng.normal(size=(s, t)).astype(np.float32)
            arrays[f"chain_b_{s}"] = rng.normal(size=t).astype(np.float32)
        arrays["bn_scale"] = rng.normal(size=dim).astype(np.float32)
        arrays["bn_shift"] = rng.normal(size=dim).astype(np.float32)
    else:
        for k in used:
            arrays[f"lift_w_{sizes[k]}"] = rng.normal(size=(sizes[k], dim)).astype(np.float32)
            arrays[f"lift_b_{sizes[k]}"] = rng.normal(size=dim).astype(np.float32)
    return arrays


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 40), min_size=6, max_size=6).filter(lambda c: sum(c) > 0),
       method=st.sampled_from(["esapn", "autoemb"]))
def test_byte_formulas_are_what_the_device_stores(counts: list[int], method: str) -> None:
    sizes = dm.candidate_sizes(128)
    arrays = layout(counts, sizes, method)
    formula = dm.esapn_bytes if method == "esapn" else dm.autoemb_bytes
    assert formula(counts, sizes) == dm.stored_bytes(arrays, 128)
    # and the device ranks from exactly these arrays: chunked scores == the lifted table
    users = np.random.default_rng(1).normal(size=(3, 128)).astype(np.float32)
    np.testing.assert_allclose(dm.lifted_scores(users, arrays, sizes, method),
                               users @ dm.lifted_table(arrays, sizes, method).T,
                               rtol=1e-4, atol=1e-4)


def test_paper_sizes_on_ml1m() -> None:
    """3,628 items at d = 128: every item at size 2 is the floor; the references' lifting
    costs (chain 2->4->...->128 for ESAPN, six maps to 128 for AutoEmb) written out."""
    sizes = dm.candidate_sizes(128)
    chain = 2 * 4 + 4 + 4 * 8 + 8 + 8 * 16 + 16 + 16 * 64 + 64 + 64 * 128 + 128
    assert dm.esapn_bytes([3628, 0, 0, 0, 0, 0], sizes) == 3628 + 4 * (3628 * 2 + chain
                                                                        + 3 * 128)
    assert dm.autoemb_bytes([3628, 0, 0, 0, 0, 0], sizes) == 3628 + 4 * (3628 * 2 + 2 * 128
                                                                         + 128 + 128)
    every = [600] * 6
    assert dm.autoemb_bytes(every, sizes) == 3600 + 4 * (600 * 222 + 222 * 128 + 6 * 128 + 128)


@pytest.mark.parametrize("cls", [ESAPN, AutoEmb])
@pytest.mark.parametrize("frac", [0.45, 0.7, 1.0])
def test_fitted_models_fit_their_budget_byte_exactly(cls, frac: float,
                                                     data: InteractionData) -> None:
    """Three budgets: bytes_used is the sum of what the device stores (its arrays and one
    user vector), equals the formula for the sizes it reports, and is within the budget."""
    budget = int(frac * full_table_bytes(data.n_items, CFG.dim))
    model = cls(CFG).fit(data, budget)
    assert model.bytes_used == dm.stored_bytes(model.arrays, CFG.dim) <= budget
    counts = [model.params["item_sizes"][str(s)] for s in SIZES16]
    formula = dm.esapn_bytes if cls is ESAPN else dm.autoemb_bytes
    assert formula(counts, SIZES16) == model.bytes_used
    assert sum(counts) == data.n_items and model.user_emb.shape == (data.n_users, CFG.dim)
    assert model.params["bytes"]["codes"] + model.params["bytes"]["tables"] + model.params[
        "bytes"]["lifting"] + model.params["bytes"]["user_vector"] == model.bytes_used
    assert json.dumps(model.params)


def test_esapn_budget_stops_growth(data: InteractionData) -> None:
    """At a tight budget growth is refused and the items stay small; with room they grow."""
    full = full_table_bytes(data.n_items, CFG.dim)
    tight = ESAPN(CFG).fit(data, int(0.45 * full))
    loose = ESAPN(CFG).fit(data, 10 * full)
    assert tight.params["growth_refused_by_budget"] > 0
    assert loose.params["growth_refused_by_budget"] == 0
    assert tight.params["mean_item_size"] < loose.params["mean_item_size"]


def test_minimum_budget_is_refused(data: InteractionData) -> None:
    for cls in (ESAPN, AutoEmb):
        with pytest.raises(BudgetError, match="minimum"):
            cls(CFG).fit(data, 500)


# --------------------------------------------------------------------------- the searches


def test_esapn_growth_keeps_the_lifted_vector(data: InteractionData) -> None:
    """An item that grows starts from its old vector mapped up (the reference's transfer), so
    its lifted vector is unchanged when it grows; the device's lift is the model's."""
    search = ESAPNSearch(data, CFG, ESAPNOptions(), 10**6)
    ids = torch.arange(data.n_items)
    before = search.item.lift(ids, "eval")[0]
    search.item.grow(ids[::2])
    search.item.grow(ids[::4])
    after = search.item.lift(ids, "eval")[0]
    torch.testing.assert_close(before, after, rtol=1e-5, atol=1e-6)
    assert sorted(set(search.item.level.tolist())) == [0, 1, 2]
    _, arrays, info = search.deploy()
    np.testing.assert_allclose(dm.lifted_table(arrays, SIZES16, "esapn"), after.detach().numpy(),
                               rtol=1e-5, atol=1e-5)
    assert info["item_sizes"] == {"2": 30, "4": 15, "8": 15, "16": 0}


def test_esapn_training_moves_sizes_and_policies(data: InteractionData) -> None:
    search = ESAPNSearch(data, CFG, ESAPNOptions(), 10**6)
    policy0 = [p.detach().clone() for p in search.item.policy.parameters()]
    rng = np.random.default_rng(0)
    u = torch.from_numpy(rng.integers(0, data.n_users, 256))
    p = torch.from_numpy(rng.integers(0, data.n_items, 256))
    n = torch.from_numpy(rng.integers(0, data.n_items, (256, 1)))
    for _ in range(5):
        search.train_step(u, p, n, 1e-2, rng)
    assert int(search.item.level.sum()) > 0 and int(search.user.level.sum()) > 0
    assert any(not torch.equal(a, b) for a, b in zip(policy0, search.item.policy.parameters(),
                                                     strict=True))


def test_autoemb_deploys_the_argmax_lift(data: InteractionData) -> None:
    search = AutoEmbSearch(data, CFG, AutoEmbOptions(), 10**6)
    rng = np.random.default_rng(0)
    u = torch.from_numpy(rng.integers(0, data.n_users, 256))
    p = torch.from_numpy(rng.integers(0, data.n_items, 256))
    n = torch.from_numpy(rng.integers(0, data.n_items, (256, 1)))
    ctrl0 = [q.detach().clone() for q in search.item.controller.parameters()]
    for _ in range(3):
        search.train_step(u, p, n, 1e-2, rng)
    # the controllers learn from validation batches
    assert any(not torch.equal(a, b) for a, b in zip(
        ctrl0, search.item.controller.parameters(), strict=True))
    _, arrays, info = search.deploy()
    assert info["demoted_items"] == 0  # a budget that fits everything
    levels = search.item_weights().argmax(axis=1)
    np.testing.assert_array_equal(arrays["codes"], levels)
    with torch.no_grad():
        cands = search.item.candidates(torch.arange(data.n_items), "eval")[0].numpy()
    np.testing.assert_allclose(dm.lifted_table(arrays, SIZES16, "autoemb"),
                               cands[np.arange(data.n_items), levels], rtol=1e-5, atol=1e-5)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 60), seed=st.integers(0, 10**6), frac=st.floats(0.0, 1.2))
def test_demotion_fits_lowers_only_and_starts_with_the_least_weighted(n: int, seed: int,
                                                                      frac: float) -> None:
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.ones(4), size=n)
    levels = weights.argmax(axis=1)
    start = dm.autoemb_bytes(np.bincount(levels, minlength=4), SIZES16)
    floor = dm.autoemb_bytes([n, 0, 0, 0], SIZES16)
    budget = int(floor + frac * (start - floor)) if frac <= 1 else start + 5
    try:
        out, demoted = demote_to_fit(levels, weights, SIZES16, budget)
    except BudgetError:
        assert floor > budget  # only when even the smallest sizes do not fit
        return
    assert dm.autoemb_bytes(np.bincount(out, minlength=4), SIZES16) <= budget
    assert (out <= levels).all() and (demoted == (out < levels)).all()
    if start <= budget:
        assert not demoted.any()
    elif (levels - out).max() == 1:  # one pass: the demoted are the least-weighted first
        w = weights[np.arange(n), levels]
        cand = levels > 0
        kept = w[cand & ~demoted]
        assert not kept.size or w[demoted].max() <= kept.min()


# --------------------------------------------------------------------------- device and models


def test_device_ranking_imports_numpy_only() -> None:
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from peel import device_multidim as dm\n"
        "from peel import device_compressed as dc\n"
        "sizes = (2, 4, 8)\n"
        "a = {'codes': np.array([0, 2, 2], dtype=np.uint8),\n"
        "     'table_2': np.ones((1, 2), np.float32), 'table_8': np.ones((2, 8), np.float32),\n"
        "     'lift_w_2': np.ones((2, 8), np.float32), 'lift_b_2': np.ones(8, np.float32),\n"
        "     'lift_w_8': np.ones((8, 8), np.float32), 'lift_b_8': np.ones(8, np.float32)}\n"
        "dc.top_k(dm.lifted_scores(np.ones((2, 8), np.float32), a, sizes, 'autoemb'), 2)\n"
        "bad = sorted(m for m in ('torch', 'scipy', 'sklearn', 'pandas') if m in sys.modules)\n"
        "print('LOADED', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert "LOADED []" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("cls", [ESAPN, AutoEmb])
def test_device_ranking_is_the_lifted_dot_product_and_beats_popularity(
        cls, data: InteractionData) -> None:
    budget = int(0.7 * full_table_bytes(data.n_items, CFG.dim))
    model = cls(CFG).fit(data, budget)
    users = np.flatnonzero(data.test.getnnz(axis=1) > 0)
    ranked = model.rank(users, k=K)
    table_scores = model.user_emb[users] @ model.item_table().T
    table_scores[data.seen_matrix("test")[users].nonzero()] = -np.inf
    np.testing.assert_array_equal(ranked, np.argsort(-table_scores, axis=1, kind="stable")[:, :K])
    recall = metrics_from_topk(ranked, users, data.test, (K,))[f"recall@{K}"].mean()
    assert recall > popularity_recall(data, users) + 0.05, (cls.name, recall)


def test_device_rejects_inconsistent_arrays() -> None:
    arrays = layout([3, 0, 2, 0], SIZES16, "autoemb")
    bad = dict(arrays, table_8=np.ones((1, 8), np.float32))
    with pytest.raises(ValueError, match="table_8"):
        dm.lifted_scores(np.ones((1, 16)), bad, SIZES16, "autoemb")
    with pytest.raises(ValueError, match="user vectors"):
        dm.lifted_scores(np.ones((1, 8)), arrays, SIZES16, "autoemb")
    with pytest.raises(ValueError, match="method"):
        dm.lifted_scores(np.ones((1, 16)), arrays, SIZES16, "lightrec")


def test_search_spaces_and_options() -> None:
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    for cls in (ESAPN, AutoEmb):
        assert cls.search_space and set(cls.search_space) <= fields
        assert REGISTRY[cls.name] is cls
    with pytest.raises(ValueError, match="esapn"):
        ESAPN(CFG, ESAPNOptions(policy_lr=0))
    with pytest.raises(ValueError, match="autoemb"):
        AutoEmb(CFG, AutoEmbOptions(controller_hidden=0))
    with pytest.raises(ValueError, match="deploy"):
        AutoEmb(CFG, AutoEmbOptions(deploy="soft"))


def test_fixed_sizes_train_one_candidate_per_item(data: InteractionData) -> None:
    """After fix_sizes the controllers stop learning, the deployment keeps the fixed levels
    and each item's device vector is its one candidate at that level."""
    search = AutoEmbSearch(data, CFG, AutoEmbOptions(), 10**6)
    rng = np.random.default_rng(0)
    levels = rng.integers(0, len(search.sizes), data.n_items)
    search.fix_sizes(levels, {"demoted_items": 3})
    u = torch.from_numpy(rng.integers(0, data.n_users, 256))
    p = torch.from_numpy(rng.integers(0, data.n_items, 256))
    n = torch.from_numpy(rng.integers(0, data.n_items, (256, 1)))
    ctrl0 = [q.detach().clone() for q in search.item.controller.parameters()]
    table0 = [t.detach().clone() for t in search.item.tables]
    for _ in range(3):
        search.train_step(u, p, n, 1e-2, rng)
    assert all(torch.equal(a, b) for a, b in zip(
        ctrl0, search.item.controller.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(table0, search.item.tables, strict=True))
    _, arrays, info = search.deploy()
    np.testing.assert_array_equal(arrays["codes"], levels)
    assert info["demoted_items"] == 3
    with torch.no_grad():
        cands = search.item.candidates(torch.arange(data.n_items), "eval")[0].numpy()
    np.testing.assert_allclose(dm.lifted_table(arrays, search.sizes, "autoemb"),
                               cands[np.arange(data.n_items), levels], rtol=1e-5, atol=1e-5)


def test_retrain_keeps_the_better_phase_on_validation(data: InteractionData) -> None:
    budget = int(0.5 * full_table_bytes(data.n_items, CFG.dim))
    cfg = dataclasses.replace(CFG, epochs=4)
    lit = AutoEmb(cfg, AutoEmbOptions(deploy="argmax")).fit(data, budget)
    model = AutoEmb(cfg, AutoEmbOptions(deploy="retrain")).fit(data, budget)
    p = model.params
    assert model.bytes_used == dm.stored_bytes(model.arrays, CFG.dim) <= budget
    # the search phase is the literal model's own search (same seed, same loop)
    assert p["search_valid_recall@20"] == lit.params["valid_recall@20"]
    assert p["valid_recall@20"] == max(p["search_valid_recall@20"],
                                       p["retrain_valid_recall@20"])
    assert p["deployed_from"] in ("search", "retrain")
    assert p["item_sizes"] == model.params["item_sizes"]
    np.testing.assert_array_equal(
        np.bincount(model.arrays["codes"], minlength=len(model.sizes)),
        np.bincount(lit.arrays["codes"], minlength=len(lit.sizes)))


def test_evaluate_path_runs_both(data: InteractionData) -> None:
    """``peel evaluate --baselines esapn,autoemb`` goes through pipeline.evaluate_baselines."""
    from peel.pipeline import RunConfig, evaluate_baselines

    cfg = dataclasses.replace(RunConfig(), pretrain=dataclasses.replace(CFG, epochs=3))
    rows = evaluate_baselines(data, cfg, ["0.7"], progress=False, methods=["esapn", "autoemb"],
                              split="valid")
    assert [r.method for r in rows] == ["ESAPN", "AutoEmb"]
    assert all(0 < r.bytes_used <= r.budget_bytes for r in rows)
    assert json.dumps([r.detail for r in rows])


def test_hard_negatives_are_the_best_scored_candidates() -> None:
    from peel.baselines.multidim import hardest_negatives

    gen = torch.Generator().manual_seed(0)
    users_tab, items = torch.randn(5, 4, generator=gen), torch.randn(30, 4, generator=gen)
    users = torch.tensor([0, 3, 3, 1])
    cand = torch.randint(0, 30, (4, 6), generator=gen)
    got = hardest_negatives(lambda i: users_tab[i], items, users, cand, 2)
    for row in range(4):
        scores = items[cand[row]] @ users_tab[users[row]]
        assert set(got[row].tolist()) == set(cand[row, scores.topk(2).indices].tolist())


@pytest.mark.parametrize("cls", [ESAPN, AutoEmb])
def test_dns_fit_is_deterministic_and_within_budget(cls, data: InteractionData) -> None:
    cfg = dataclasses.replace(CFG, sampling="dns", dns_candidates=8, epochs=3)
    budget = int(0.7 * full_table_bytes(data.n_items, CFG.dim))
    a, b = cls(cfg).fit(data, budget), cls(cfg).fit(data, budget)
    assert a.bytes_used == dm.stored_bytes(a.arrays, CFG.dim) <= budget
    np.testing.assert_array_equal(a.user_emb, b.user_emb)
    users = np.arange(data.n_users)
    np.testing.assert_array_equal(a.rank(users, k=K), b.rank(users, k=K))
