"""peel.tuning: the same validation budget for every method, chosen on validation only."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any, ClassVar

import numpy as np
import pytest
import scipy.sparse as sp

from peel.baselines import REGISTRY, EmbeddingRecommender
from peel.baselines.base import fixed_size_bytes, fixed_size_dim
from peel.budget import full_table_bytes
from peel.data import InteractionData
from peel.pretrain import PretrainConfig
from peel.synthetic import SyntheticConfig, make_demo
from peel.tuning import METRIC, NOT_TUNABLE, check_space, draw_trials, tune, validation_recall

CFG = PretrainConfig(dim=16, block_dim=8, layers=1, epochs=4, batch_size=1024, lr=2e-2,
                     patience=2, sampling="uniform", lr_half_life=0, diversity=0.0, seed=3)


@pytest.fixture(scope="module")
def data() -> InteractionData:
    return make_demo(SyntheticConfig(n_users=200, n_items=120, n_communities=3, n_topics=6,
                                     mean_interactions=20, seed=2))


class NoTestData:
    """The data with its test split locked: any read of it fails the test."""

    def __init__(self, data: InteractionData) -> None:
        self._data = data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._data, name)

    @property
    def test(self) -> sp.csr_matrix:
        raise AssertionError("tuning read the test split")

    def split_matrix(self, split: str) -> sp.csr_matrix:
        assert split != "test", "tuning read the test split"
        return self._data.split_matrix(split)

    def seen_matrix(self, split: str) -> sp.csr_matrix:
        assert split != "test", "tuning read the test split"
        return self._data.seen_matrix(split)


def test_every_registered_space_names_tunable_config_fields() -> None:
    known = {f.name for f in fields(PretrainConfig)}
    for name, cls in REGISTRY.items():
        check_space(name, cls.search_space)  # raises on a bad one
        assert set(cls.search_space) <= known - NOT_TUNABLE
    assert REGISTRY["lightgcn-svd"].search_space == {}  # nothing to tune, by declaration
    assert {"lr", "l2", "negatives"} <= set(REGISTRY["pmf"].search_space)
    assert "layers" in REGISTRY["lightgcn"].search_space


@pytest.mark.parametrize("space", [{"dim": (8, 16)}, {"nope": (1,)}, {"lr": ()},
                                   {"lr": [0.1, 0.2]}])
def test_bad_spaces_are_refused(space: dict) -> None:
    with pytest.raises(ValueError, match="search_space"):
        check_space("x", space)


def test_trials_are_the_default_then_distinct_seeded_draws() -> None:
    space = {"lr": (1e-3, 1e-2, 2e-2), "negatives": (1, 2, 4), "l2": (1e-5, 1e-4)}
    a = draw_trials("pmf", space, CFG, 6, seed=7)
    assert a == draw_trials("pmf", space, CFG, 6, seed=7)  # same seed, same trials
    assert a[0] == {} and len(a) == 6
    settings = [tuple(sorted(t.items())) for t in a[1:]]
    assert len(set(settings)) == 5
    own = {k: getattr(CFG, k) for k in space}
    assert all(t != own for t in a[1:])  # never a copy of trial 0
    others = [draw_trials("pmf", space, CFG, 6, seed=s) for s in range(8, 14)]
    assert any(o != a for o in others)  # the seed matters
    # a small space is enumerated, not padded with repeats
    tiny = draw_trials("pmf", {"negatives": (1, 2, 3)}, CFG, 10, seed=0)
    assert sorted(t.get("negatives", 1) for t in tiny) == [1, 2, 3]
    assert draw_trials("lightgcn-svd", {}, CFG, 4, seed=0) == [{}]


def test_tune_chooses_the_validation_argmax_without_reading_test(data: InteractionData
                                                                ) -> None:
    budget = full_table_bytes(data.n_items, 16) // 2
    locked = NoTestData(data)
    model, log = tune("pmf", locked, budget, CFG, n_trials=4, seed=1)  # type: ignore[arg-type]
    scores = [t[f"valid_{METRIC}"] for t in log["log"]]
    assert log["trials"] == 4 and len(scores) == 4
    assert log["chosen_trial"] == int(np.argmax(scores))
    assert log["chosen"] == log["log"][log["chosen_trial"]]["params"]
    assert log[f"valid_{METRIC}"] == max(scores)
    assert validation_recall(model, data) == pytest.approx(max(scores))  # the fitted best
    assert model.params["tuning"] is log and model.bytes_used <= budget
    assert model.params["l2"] == log["chosen"]["l2"]
    assert len({tuple(sorted(t["params"].items())) for t in log["log"]}) == 4
    again, log2 = tune("pmf", locked, budget, CFG, n_trials=4, seed=1)  # type: ignore[arg-type]
    assert [t["params"] for t in log2["log"]] == [t["params"] for t in log["log"]]
    np.testing.assert_array_equal(again.item_emb, model.item_emb)


class Scripted(EmbeddingRecommender):
    """A fake method whose validation quality is set by ``lr``: the best lr must win."""

    name: ClassVar[str] = "scripted"
    label: ClassVar[str] = "scripted"
    search_space: ClassVar[dict[str, tuple]] = {"lr": (0.1, 0.2, 0.3, 0.4, 0.5)}

    def fit(self, data: InteractionData, budget_bytes: int) -> Scripted:
        rng = np.random.default_rng(0)
        dim = 4
        truth = data.valid.toarray()
        noise = rng.normal(size=truth.shape)
        good = float(self.config.lr == 0.3)  # only lr=0.3 sees the validation items
        self.user_emb = np.hstack([truth * good + noise * 0.1, np.zeros((truth.shape[0], dim))])
        self.item_emb = np.hstack([np.eye(truth.shape[1]), np.zeros((truth.shape[1], dim))])
        self.data = data
        self.bytes_used = fixed_size_bytes(dim, data.n_items)
        self.params = {"dim": dim}
        return self


def test_tune_is_generic_over_the_registry(data: InteractionData,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(REGISTRY, "scripted", Scripted)
    model, log = tune("scripted", NoTestData(data), 10**6, CFG,  # type: ignore[arg-type]
                      n_trials=5, seed=0, make=Scripted)
    assert log["chosen"] == {"lr": 0.3} and model.config.lr == 0.3
    assert log[f"valid_{METRIC}"] > 0.9


def test_nothing_to_tune_is_one_trial_and_says_so(data: InteractionData) -> None:
    budget = full_table_bytes(data.n_items, 16) // 2
    model, log = tune("lightgcn-svd", NoTestData(data), budget, CFG,  # type: ignore[arg-type]
                      n_trials=4, seed=0)
    assert log["trials"] == 1 and "nothing to tune" in log["note"]
    assert model.params["dim"] == fixed_size_dim(budget, data.n_items) and log["chosen"] == {}


def test_tuning_needs_a_validation_split(data: InteractionData) -> None:
    empty = InteractionData(data.train, sp.csr_matrix(data.valid.shape, dtype=np.float32),
                            data.test, data.user_ids, data.item_ids)
    with pytest.raises(ValueError, match="no validation split"):
        tune("pmf", empty, 10**5, CFG, n_trials=2)
    with pytest.raises(ValueError, match="n_trials"):
        tune("pmf", data, 10**5, CFG, n_trials=0)


def test_a_catalogue_under_20_items_is_tuned_on_its_whole_length() -> None:
    from peel.data import from_interactions

    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(60), 6)
    items = (users % 2) * 6 + rng.integers(0, 6, users.size)  # 12 items, two communities
    tiny = from_interactions(users, items, name="tiny")
    model, log = tune("pmf", tiny, full_table_bytes(tiny.n_items, 8), CFG, n_trials=2, seed=0)
    assert 0 < log[f"valid_{METRIC}"] <= 1 and model.bytes_used <= full_table_bytes(12, 8)


def test_trials_run_by_an_executor_give_the_serial_rows(data: InteractionData) -> None:
    """Trials of every method and budget spread over an executor: same choice, same rows."""
    from dataclasses import replace

    from peel.executor import SerialExecutor
    from peel.pipeline import RunConfig, TrialTask, evaluate_baselines

    cfg = replace(RunConfig(), pretrain=CFG)
    budgets = ["0.2", "0.5"]
    methods = ["bpr-mf", "pmf"]
    serial = evaluate_baselines(data, cfg, budgets, progress=False, methods=methods,
                                tune_trials=3)

    class Recorder(SerialExecutor):
        tasks: ClassVar[list] = []

        def map(self, fn, tasks, labels=None, shared=None):
            Recorder.tasks = list(tasks)
            return super().map(fn, tasks, labels, shared)

    spread = evaluate_baselines(data, cfg, budgets, progress=False, methods=methods,
                                tune_trials=3, executor=Recorder(progress=False))
    assert len(Recorder.tasks) == 3 * len(budgets) * len(methods)  # one task per trial
    assert all(isinstance(t, TrialTask) for t in Recorder.tasks)
    assert [(r.method, r.budget) for r in spread] == [(r.method, r.budget) for r in serial]
    for a, b in zip(serial, spread, strict=True):
        assert a.metrics == b.metrics
        assert a.detail["tuning"]["chosen_trial"] == b.detail["tuning"]["chosen_trial"]
        assert ([t["valid_recall@20"] for t in a.detail["tuning"]["log"]]
                == [t["valid_recall@20"] for t in b.detail["tuning"]["log"]])


def test_executor_workers_build_stage1_methods_from_the_sent_tables(data: InteractionData
                                                                    ) -> None:
    """The truncations and LightRec's teacher come from the run's tables sent to the workers,
    not from a stage 1 retrained in every worker."""
    from peel.baselines import from_stage1_tables as _from_stage1
    from peel.pipeline import BaselineShared, _builder

    rng = np.random.default_rng(0)
    tables = (rng.standard_normal((data.n_users, 16)).astype(np.float32),
              rng.standard_normal((data.n_items, 16)).astype(np.float32))
    shared = BaselineShared(data, CFG, "test", (20,), tables)
    assert _from_stage1("lightrec") and _from_stage1("lightgcn-svd-int4")
    assert not _from_stage1("lightgcn") and not _from_stage1("pmf")
    teacher = _builder("lightrec", shared)(CFG).teacher
    np.testing.assert_array_equal(teacher[1], tables[1])
    assert _builder("lightgcn-svd", shared)(CFG).rotated is not None
    assert type(_builder("pmf", shared)(CFG)).__name__ == "PMF"


def test_stage1_tuned_with_the_lightgcn_baselines_trials(data: InteractionData, tmp_path
                                                         ) -> None:
    """[pretrain] trials: stage 1 tries the LightGCN baseline's own draws, keeps the best on
    validation, records every trial, and a finished trial is not trained again."""
    from dataclasses import replace

    from peel.pretrain import load_embeddings
    from peel.tuning import STAGE1_SPACE, chosen_stage1_config, stage1_trials, tune_stage1

    cfg = replace(CFG, trials=3, epochs=2)
    trials = stage1_trials(cfg)
    assert trials == draw_trials(STAGE1_SPACE, REGISTRY["lightgcn"].search_space, cfg, 3,
                                 cfg.seed)  # the baseline's candidates, trial 0 = cfg
    assert trials[0] == {} and len(trials) == 3
    stage = tmp_path / "pretrain"
    chosen = tune_stage1(NoTestData(data), cfg, stage, progress=False)
    record = json.loads((stage / "tuning.json").read_text())
    recalls = [t["valid_recall@20"] for t in record["log"]]
    assert record["chosen_trial"] == recalls.index(max(recalls))
    assert chosen == chosen_stage1_config(cfg, stage)
    assert chosen.trials == 1 and {k: getattr(chosen, k) for k in record["chosen"]} == record[
        "chosen"]
    best = stage / "trials" / f"trial{record['chosen_trial']}"
    for a, b in zip(load_embeddings(stage), load_embeddings(best), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not any((stage / "trials").glob("*/checkpoint"))  # removed once saved
    stamps = {p: p.stat().st_mtime_ns for p in stage.glob("trials/*/embeddings.safetensors")}
    tune_stage1(NoTestData(data), cfg, stage, progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing retrained
    from peel.executor import ProcessExecutor

    side = tmp_path / "side_by_side"
    tune_stage1(data, cfg, side, progress=False, executor=ProcessExecutor(2, progress=False))
    assert json.loads((side / "tuning.json").read_text())["log"] == [
        {**t, "seconds": json.loads((side / "tuning.json").read_text())["log"][i]["seconds"]}
        for i, t in enumerate(record["log"])]  # the same trials, scores and choice
    for a, b in zip(load_embeddings(stage), load_embeddings(side), strict=True):
        np.testing.assert_array_equal(a, b)
    saved = stage / "trials" / "trial1" / "pretrain_config.json"
    doc = json.loads(saved.read_text())
    saved.write_text(json.dumps({**doc, "lr": doc["lr"] * 2}))  # a stale trial of another lr
    with pytest.raises(ValueError, match="lr"):
        tune_stage1(NoTestData(data), cfg, stage, progress=False)
    with pytest.raises(ValueError, match="trials"):
        replace(CFG, trials=0).validate()


def test_train_with_stage1_trials_resumes_and_checks_the_chosen_config(tmp_path) -> None:
    from dataclasses import replace

    from peel.pipeline import _check_pretrain_config, demo_config, train

    data_ = make_demo(SyntheticConfig(n_users=150, n_items=90, n_communities=3, n_topics=6,
                                      mean_interactions=15, seed=5))
    cfg = demo_config(1)
    cfg = replace(cfg, pretrain=replace(CFG, trials=2, epochs=2),
                  finetune=replace(cfg.finetune, max_epochs=1, n_blocks=2, block_dim=8),
                  deploy=replace(cfg.deploy, precision_candidates=()))
    cfg = replace(cfg, groups=replace(cfg.groups, n_user_groups=2, n_item_groups=2))
    out = tmp_path / "run"
    train(cfg, out, progress=False, data=data_)
    stage = out / "pretrain"
    assert (stage / "tuning.json").exists()
    _check_pretrain_config(stage, cfg.pretrain)  # passes: the chosen trial's config
    from peel.report import stage_rows

    row = stage_rows([out])[0]
    chosen = json.loads((stage / "tuning.json").read_text())["chosen"]
    assert row["pretrain_trials"] == 2 and json.loads(row["pretrain_chosen"]) == chosen
    before = (stage / "embeddings.safetensors").stat().st_mtime_ns
    train(cfg, out, progress=False, data=data_)
    assert (stage / "embeddings.safetensors").stat().st_mtime_ns == before
    (stage / "tuning.json").unlink()
    with pytest.raises(ValueError, match=r"tuning\.json"):
        _check_pretrain_config(stage, cfg.pretrain)
