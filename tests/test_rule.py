"""RULE (peel.baselines.rule): budgets, exact bytes, labels that match the runtime, estimator,
and a reproducible evolution. Generated data and random tables only: a few seconds in all."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from peel.baselines import REGISTRY, make_baseline
from peel.baselines.rule import (
    Budgeter,
    Estimator,
    Rule,
    RuleConfig,
    ValidationLabeller,
    mutate,
    pick_eval_users,
    random_config,
    regularized_evolution,
    selection_of,
    spearman,
    write_rule_package,
)
from peel.budget import BudgetError, full_table_bytes
from peel.data import DataConfig, InteractionData, from_interactions
from peel.eval import evaluate
from peel.io import save_npz, write_json
from peel.pretrain import PretrainConfig

N_BLOCKS, D, GROUPS = 4, 8, 5
FAST = RuleConfig(n_item_groups=GROUPS, n_configs=24, eval_users=40, population=6, cycles=8,
                  sample=3, epochs=30, seed=5)


def community_data(seed: int = 0, n_users: int = 120, n_items: int = 80) -> InteractionData:
    """Users of community c mostly pick items of pool c, popular ones more often."""
    rng = np.random.default_rng(seed)
    pools = np.array_split(rng.permutation(n_items), 4)
    users, items = [], []
    for u in range(n_users):
        pool = pools[u % 4]
        w = 1.0 / np.arange(1, len(pool) + 1)
        for i in {*rng.choice(pool, 10, replace=False, p=w / w.sum()).tolist(),
                  int(rng.integers(n_items))}:
            users.append(u)
            items.append(i)
    return from_interactions(users, items, DataConfig(seed=seed), name="communities")


@pytest.fixture(scope="module")
def data() -> InteractionData:
    return community_data()


@pytest.fixture(scope="module")
def tables(data: InteractionData) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    dim = N_BLOCKS * D
    return (rng.standard_normal((data.n_users, dim)).astype(np.float32),
            rng.standard_normal((data.n_items, dim)).astype(np.float32))


def model(tables: tuple[np.ndarray, np.ndarray], cfg: RuleConfig = FAST) -> Rule:
    pcfg = PretrainConfig(dim=N_BLOCKS * D, block_dim=D, seed=5)
    return Rule.from_embeddings(*tables, pcfg, cfg)


def budgeter_for(data: InteractionData) -> Budgeter:
    groups = np.arange(data.n_items) * GROUPS // data.n_items
    return Budgeter(groups, GROUPS, N_BLOCKS, D, "none")


def minimum(b: Budgeter) -> int:
    one = np.zeros(b.shape, dtype=bool)
    one[:, 0] = True
    return b.total(one)


# --------------------------------------------------------------------------- budgets and bytes


@settings(max_examples=12, deadline=None)
@given(share=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_searched_configuration_never_exceeds_the_budget(
        share: float, seed: int, data: InteractionData,
        tables: tuple[np.ndarray, np.ndarray]) -> None:
    full = full_table_bytes(data.n_items, N_BLOCKS * D) + 4096
    low = minimum(budgeter_for(data))
    budget = low + int(share * (full - low))
    rule = model(tables, replace(FAST, seed=seed)).fit(data, budget)
    assert rule.mask is not None and rule.package is not None
    assert 0 < rule.bytes_used <= budget
    assert rule.mask.any(axis=1).all()  # every item stays rankable
    # the byte count is what the package layout says for exactly this mask
    assert rule.bytes_used == budgeter_for(data).total(rule.mask)
    assert rule.bytes_used == rule.package.report.total
    kept = {tuple(p) for p in rule.package.selection.astype(int).tolist()}
    assert kept == {tuple(p) for p in np.argwhere(rule.mask).tolist()}


@settings(max_examples=40, deadline=None)
@given(share=st.floats(0.0, 1.0), seed=st.integers(0, 2**16), fill=st.booleans())
def test_random_and_mutated_configurations_stay_within_the_budget(
        share: float, seed: int, fill: bool, data: InteractionData) -> None:
    b = budgeter_for(data)
    low = minimum(b)
    budget = low + int(share * (full_table_bytes(data.n_items, N_BLOCKS * D) + 4096 - low))
    rng = np.random.default_rng(seed)
    mask = random_config(rng, b, budget, fill)
    assert b.fits(mask, budget)
    if fill:  # full: no further pair of the smallest group fits
        assert mask.all() or min(b.total(_plus(mask, p)) for p in np.argwhere(~mask)) > budget
    for _ in range(10):
        mask = mutate(mask, rng, b, budget)
        assert b.fits(mask, budget)


def _plus(mask: np.ndarray, pair: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[tuple(pair)] = True
    return out


def test_package_bytes_are_exact(data: InteractionData, tables: tuple[np.ndarray, np.ndarray],
                                 tmp_path: Path) -> None:
    b = budgeter_for(data)
    budget = minimum(b) + 3000
    mask = random_config(np.random.default_rng(0), b, budget, fill=True)
    groups = np.arange(data.n_items) * GROUPS // data.n_items
    pkg = write_rule_package(tmp_path / "r.peel", tables[1], groups, mask, b, budget)
    size = (tmp_path / "r.peel").stat().st_size
    assert pkg.report.file_bytes == size
    assert pkg.report.total == size + N_BLOCKS * D * 4  # the user vector, reserved
    assert pkg.report.total == b.total(mask) <= budget
    assert budget - pkg.report.total < 3 * 8 * D * 4  # a full config leaves < one pair spare


def test_budget_below_one_block_per_group_is_refused(
        data: InteractionData, tables: tuple[np.ndarray, np.ndarray]) -> None:
    low = minimum(budgeter_for(data))
    with pytest.raises(BudgetError, match=f"use a budget of {low} bytes"):
        model(tables).fit(data, low - 1)
    assert model(tables).fit(data, low).bytes_used == low


def test_selection_puts_one_block_per_group_first() -> None:
    mask = np.array([[0, 1, 1], [1, 0, 1], [0, 0, 1]], dtype=bool)
    order = selection_of(mask)
    assert order[:3].tolist() == [[0, 1], [1, 0], [2, 2]]
    assert {tuple(p) for p in order.tolist()} == {tuple(p) for p in np.argwhere(mask).tolist()}


# --------------------------------------------------------------------------- labels = runtime


@pytest.mark.parametrize("scale", ["none", "eq10"])
def test_labels_measure_what_the_package_ranks(
        scale: str, data: InteractionData, tables: tuple[np.ndarray, np.ndarray],
        tmp_path: Path) -> None:
    b = Budgeter(np.arange(data.n_items) * GROUPS // data.n_items, GROUPS, N_BLOCKS, D, scale)
    groups = np.arange(data.n_items) * GROUPS // data.n_items
    budget = minimum(b) + 2500
    mask = random_config(np.random.default_rng(3), b, budget, fill=True)
    pkg = write_rule_package(tmp_path / "r.peel", tables[1], groups, mask, b, budget)
    users = pick_eval_users(data, 60, 0)
    lab = ValidationLabeller(data, *tables, groups, D, users, 10, scale)
    table = lab.item_table(mask).numpy()
    runtime = pkg.scores(tables[0][users])
    np.testing.assert_allclose(runtime, tables[0][users] @ table.T, rtol=1e-4, atol=1e-4)
    measured = evaluate(lambda u: pkg.scores(tables[0][u]), data, "valid", ks=(10,),
                        users=users)
    assert lab.recall(mask) == pytest.approx(measured["recall@10"], abs=1e-9)


def test_labelling_users_are_validation_users_fixed_by_seed(data: InteractionData) -> None:
    users = pick_eval_users(data, 30, 4)
    assert len(users) == 30 and (data.valid.getnnz(axis=1)[users] > 0).all()
    np.testing.assert_array_equal(users, pick_eval_users(data, 30, 4))
    assert not np.array_equal(users, pick_eval_users(data, 30, 5))


# --------------------------------------------------------------------------- estimator, search


def test_estimator_ranks_an_additive_target() -> None:
    rng = np.random.default_rng(0)
    masks = rng.random((400, GROUPS, N_BLOCKS)) < 0.5
    weights = rng.standard_normal((GROUPS, N_BLOCKS))
    y = (masks * weights).sum(axis=(1, 2)) + 0.1 * rng.standard_normal(400)
    est = Estimator(RuleConfig(epochs=200), GROUPS * N_BLOCKS, seed=0).fit(masks[:300], y[:300])
    assert spearman(est.predict(masks[300:]), y[300:]) > 0.9
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))


def test_evolution_is_reproducible_and_improves() -> None:
    target = np.random.default_rng(9).random((GROUPS, N_BLOCKS)) < 0.5

    def run(seed: int) -> tuple[np.ndarray, list[float]]:
        rng = np.random.default_rng(seed)
        evo = regularized_evolution(
            fitness=lambda m: float((m == target).sum()),
            init=lambda: rng.random((GROUPS, N_BLOCKS)) < 0.5,
            mutation=lambda m: _flip(m, rng), rng=rng, population=20, cycles=50, sample=5)
        return evo.best, evo.history

    best, history = run(1)
    again, history2 = run(1)
    np.testing.assert_array_equal(best, again)
    assert history == history2 and len(history) == 70
    assert max(history) > max(history[:20])  # the cycles found better than the start


def _flip(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = mask.copy()
    out.flat[int(rng.integers(out.size))] ^= True
    return out


def test_fit_is_reproducible_for_a_seed(data: InteractionData,
                                        tables: tuple[np.ndarray, np.ndarray]) -> None:
    budget = minimum(budgeter_for(data)) + 4000
    a = model(tables).fit(data, budget)
    b = model(tables).fit(data, budget)
    assert a.mask is not None and b.mask is not None
    np.testing.assert_array_equal(a.mask, b.mask)
    timeless = {k: v for k, v in a.params.items() if not k.endswith("seconds")}
    assert timeless == {k: v for k, v in b.params.items() if not k.endswith("seconds")}
    users = np.arange(20)
    np.testing.assert_array_equal(a.rank(users, k=5), b.rank(users, k=5))
    other = model(tables, replace(FAST, seed=6)).fit(data, budget)
    assert other.params["estimator_spearman"] != a.params["estimator_spearman"]


def test_params_report_the_estimator_and_times(data: InteractionData,
                                               tables: tuple[np.ndarray, np.ndarray]) -> None:
    rule = model(tables).fit(data, minimum(budgeter_for(data)) + 4000)
    p = rule.params
    assert p["configs_labelled"] == FAST.n_configs and p["eval_users"] == FAST.eval_users
    assert p["configs_held_back"] == round(FAST.holdout * FAST.n_configs)
    assert -1 <= p["estimator_spearman"] <= 1
    assert sum(p["blocks_per_group"]) == p["blocks_kept"] == int(rule.mask.sum())
    assert p["best_labelled_valid_recall@20"] >= 0
    assert p["deploy_seconds"] >= p["search_seconds"] >= 0
    assert Rule.search_space == {}


# --------------------------------------------------------------------------- a run's stage 1


def test_from_run_reuses_stage1_and_its_item_groups(
        data: InteractionData, tables: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    (tmp_path / "pretrain").mkdir()
    save_file({"user_emb": tables[0], "item_emb": tables[1]},
              str(tmp_path / "pretrain" / "embeddings.safetensors"))
    write_json(tmp_path / "pretrain" / "pretrain_log.json",
               {"history": [{"elapsed": 3.0}, {"elapsed": 12.5}]})
    groups = np.random.default_rng(2).permutation(np.arange(data.n_items) % GROUPS)
    save_npz(tmp_path / "partition.npz", {"item_group": groups.astype(np.int64)})
    pcfg = PretrainConfig(dim=N_BLOCKS * D, block_dim=D, seed=5)
    rule = make_baseline("rule", pcfg, run=tmp_path)
    assert isinstance(rule, Rule) and REGISTRY["rule"] is Rule and rule.label == "RULE"
    rule.rule = FAST
    rule.fit(data, full_table_bytes(data.n_items, N_BLOCKS * D) // 2)
    np.testing.assert_array_equal(rule.item_group, groups)
    assert rule.params["stage1_seconds"] == 12.5
    np.testing.assert_array_equal(rule.user_emb, tables[0])  # no retraining
