"""peel.autoprecision: a run chooses the rule "auto" stands for on its own validation split."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from peel import runfolder
from peel.autoprecision import TIE, choose, is_current, precision_stage, score_candidates
from peel.budget import BLOCK_KINDS
from peel.device import open_package
from peel.io import write_json
from peel.package import DEFAULT_PRECISION
from peel.pipeline import (
    deploy_options,
    deploy_package,
    load_config,
    load_run_config,
    run_data,
)
from peel.runfolder import RunFolderError, chosen_precision

SMALL = [
    "pretrain.dim=16", "pretrain.layers=1", "pretrain.epochs=2", "pretrain.batch_size=2048",
    "groups.n_user_groups=2", "groups.n_item_groups=3",
    "finetune.n_blocks=2", "finetune.block_dim=8", "finetune.max_epochs=1",
    "finetune.eval_users=100", "run.workers=1", 'deploy.budgets=0.3,0.7',
    "deploy.precision_candidates=int4r25,int4r0,int4r50,int4r100,int8s",
]


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    import peel

    out = tmp_path_factory.mktemp("auto") / "run"
    peel.PEEL(peel.load_config(None, SMALL), seed=3).fit("demo:3", out=out)
    return out


def test_choose_takes_the_first_candidate_within_the_tie():
    means = {"a": 0.2000, "b": 0.2004, "c": 0.2010}
    assert choose(means, ["a", "b", "c"]) == "c"  # a and b are more than TIE below c
    assert choose({"a": 0.2010 - TIE / 2, "c": 0.2010}, ["a", "c"]) == "a"  # tied: first wins
    assert choose({"a": 0.2010 - TIE / 2, "c": 0.2010}, ["c", "a"]) == "c"
    with pytest.raises(ValueError):
        choose({}, [])


def test_train_chooses_the_best_candidate_on_validation_and_deploys_it(auto_run):
    doc = json.loads((auto_run / runfolder.PRECISION_FILE).read_text())
    cfg = load_run_config(auto_run)
    assert doc["split"] == "valid" and doc["candidates"] == list(cfg.deploy.precision_candidates)
    means = {rule: np.mean([row["recall@20"] for row in doc["results"][rule].values()])
             for rule in doc["candidates"]}
    assert doc["rule"] == choose(means, doc["candidates"])
    assert chosen_precision(auto_run) == doc["rule"]
    assert deploy_options(cfg, auto_run).precision == doc["rule"]
    assert deploy_options(cfg).precision == "auto"  # without the run: the fixed default
    summary = json.loads((auto_run / "train_summary.json").read_text())
    assert summary["precision"] == doc["rule"] and summary["seconds"]["precision"] > 0


def test_a_deployed_auto_package_uses_the_runs_rule(auto_run, tmp_path):
    rule = chosen_precision(auto_run)
    deploy_package(auto_run, "0.7", tmp_path / "auto.peel", group=0)
    deploy_package(auto_run, "0.7", tmp_path / "same.peel", group=0, precision=rule)
    assert (tmp_path / "auto.peel").read_bytes() == (tmp_path / "same.peel").read_bytes()
    pkg = open_package(tmp_path / "auto.peel")
    other = "int8s" if rule != "int8s" else "int4r0"
    deploy_package(auto_run, "0.7", tmp_path / "other.peel", group=0, precision=other)
    assert (tmp_path / "other.peel").read_bytes() != (tmp_path / "auto.peel").read_bytes()
    assert set(BLOCK_KINDS[k] for k in pkg.kinds.tolist()) <= {"i8s", "i4s", "r4s"}


def test_the_choice_is_redone_when_groups_change_and_dropped_when_fixed(auto_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(auto_run, run)
    cfg = load_run_config(run)
    candidates, budgets = list(cfg.deploy.precision_candidates), list(cfg.deploy.budgets)
    assert is_current(run, candidates, budgets)
    assert not is_current(run, candidates[:2], budgets)
    group = runfolder.group_paths(run, 0)[0]
    group.write_bytes(group.read_bytes())  # same bytes: still current
    assert is_current(run, candidates, budgets)
    arrays = dict(np.load(group, allow_pickle=False))
    arrays["alpha"] = arrays["alpha"][::-1].copy()
    np.savez(group, **arrays)
    assert not is_current(run, candidates, budgets)
    data = run_data(run, cfg)
    assert precision_stage(run, data, cfg) in candidates
    assert is_current(run, candidates, budgets)
    fixed = replace(cfg, deploy=replace(cfg.deploy, precision="int8s"))
    assert precision_stage(run, data, fixed) is None
    assert chosen_precision(run) is None
    empty = replace(cfg, deploy=replace(cfg.deploy, precision_candidates=()))
    assert precision_stage(run, data, empty) is None
    assert deploy_options(cfg, run).precision == "auto"  # packages then use DEFAULT_PRECISION
    assert cfg.deploy.precision_candidates[0] == DEFAULT_PRECISION == "int4r25"


def test_a_hand_edited_choice_is_refused_with_the_file_and_the_fix(tmp_path):
    write_json(tmp_path / runfolder.PRECISION_FILE, {"rule": "int3"})
    with pytest.raises(RunFolderError, match=r"precision\.json.*'int3'.*delete the file"):
        chosen_precision(tmp_path)


def test_candidates_are_validated():
    cfg = load_config(None)
    for bad in (("int4r25", "int2"), ("int8s", "int8s")):
        with pytest.raises(ValueError, match="precision_candidates"):
            replace(cfg, deploy=replace(cfg.deploy, precision_candidates=bad)).validate()


def _benchmark():
    path = Path(__file__).parents[1] / "benchmarks" / "precision_per_run.py"
    spec = importlib.util.spec_from_file_location("precision_per_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_crossfit_scores_each_half_with_the_other_halfs_choice():
    bench = _benchmark()
    users = np.arange(8)
    # even users prefer rule "a", odd users prefer rule "b"
    a = {"users": users, "recall@20": np.where(users % 2 == 0, 1.0, 0.0)}
    b = {"users": users, "recall@20": np.where(users % 2 == 0, 0.0, 0.5)}
    per_user = {"a": {"x": a}, "b": {"x": b}}
    cf = bench.crossfit(per_user, ["a", "b"], ["x"])
    assert cf["chosen_on_half"] == {"0": "a", "1": "b"}
    # the even half is scored by b (chosen on the odd half): 0; the odd half by a: 0
    assert cf["recall@20"]["x"] == 0.0
    same = {"a": {"x": a}, "b": {"x": {"users": users, "recall@20": np.zeros(8)}}}
    assert bench.crossfit(same, ["a", "b"], ["x"])["recall@20"]["x"] == pytest.approx(0.5)


def test_benchmark_scores_a_run_on_validation_only(auto_run, tmp_path, monkeypatch):
    bench = _benchmark()
    seen = []
    import peel.pipeline as pipeline

    real = pipeline.evaluate_peel

    def spy(run, data, cfg, budgets, split="test", **kw):
        seen.append(split)
        return real(run, data, cfg, budgets, split, **kw)

    monkeypatch.setattr(pipeline, "evaluate_peel", spy)
    doc = bench.score_run(auto_run, write_choice=False)
    assert set(seen) == {"valid"}
    assert doc["chosen_on_all"] == chosen_precision(auto_run)
    cfg = load_run_config(auto_run)
    results, _ = score_candidates(auto_run, run_data(auto_run, cfg), cfg,
                                  doc["candidates"][:1], doc["budgets"])
    first = doc["candidates"][0]
    assert doc["fixed"][first] == {b: results[first][b]["recall@20"] for b in doc["budgets"]}


def test_auto_asked_explicitly_means_the_runs_choice(auto_run, tmp_path):
    from peel.pipeline import evaluate_peel

    rule = chosen_precision(auto_run)
    deploy_package(auto_run, "0.3", tmp_path / "a.peel", group=1, precision="auto")
    deploy_package(auto_run, "0.3", tmp_path / "r.peel", group=1, precision=rule)
    assert (tmp_path / "a.peel").read_bytes() == (tmp_path / "r.peel").read_bytes()
    cfg = load_run_config(auto_run)
    data = run_data(auto_run, cfg)
    asked, own = (evaluate_peel(auto_run, data, cfg, ["0.3"], "valid", precision=p)[0]
                  for p in ("auto", None))
    assert asked.method == own.method == cfg.run.label and asked.metrics == own.metrics
    assert asked.detail["precision"] == own.detail["precision"] == rule  # recorded per row


def test_budgets_below_a_packages_minimum_are_left_out_of_the_choice(auto_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(auto_run, run)
    cfg = load_run_config(run)
    data = run_data(run, cfg)
    tiny = replace(cfg, deploy=replace(cfg.deploy, budgets=("100", "0.7")))
    assert precision_stage(run, data, tiny) in cfg.deploy.precision_candidates
    doc = json.loads((run / runfolder.PRECISION_FILE).read_text())
    assert doc["scored_budgets"] == ["0.7"] and doc["budgets"] == ["100", "0.7"]
    assert list(doc["results"][doc["rule"]]) == ["0.7"]
    none_fit = replace(cfg, deploy=replace(cfg.deploy, budgets=("100",)))
    assert precision_stage(run, data, none_fit) is None and chosen_precision(run) is None
