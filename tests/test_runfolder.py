"""Regression tests of the run-folder contract (issues 12 and 15): what is deployed is what was
measured, in-memory data round-trips, data is pinned, incomplete runs are refused, k is
configurable, overrides are strict, baselines are selectable by name."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import peel
from peel.cli import main
from peel.pipeline import evaluate, load_run_config, train
from peel.runfolder import RunFolderError
from peel.synthetic import SyntheticConfig, make_demo

RUN_CONFIG = """
[run]
workers = 1

[pretrain]
dim = 32
block_dim = 8
layers = 1
epochs = 3
batch_size = 2048
patience = 2

[groups]
n_user_groups = 3
n_item_groups = 4

[finetune]
n_blocks = 4
block_dim = 8
max_epochs = 1
patience = 1
eval_users = 100

[deploy]
budgets = ["0.5", "1MB"]
baselines = ["pmf"]
similarity = "literal"
weighting = "alpha"
k = 20
"""


def small_data(seed: int = 4, n_items: int = 160):
    return make_demo(SyntheticConfig(n_users=240, n_items=n_items, n_communities=3,
                                     n_topics=6, mean_interactions=20, min_interactions=8,
                                     seed=seed))


def write_csv(data, path: Path) -> None:
    """The dataset's interactions as a user,item file (ids as the dataset knows them)."""
    rows = []
    for split in ("train", "valid", "test"):
        m = data.split_matrix(split).tocoo()
        rows += [(data.user_ids[u], data.item_ids[i]) for u, i in zip(m.row, m.col, strict=True)]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user", "item"])
        w.writerows(rows)


@pytest.fixture(scope="module")
def file_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run trained by `peel train` on a CSV file, with non-default [deploy] settings."""
    root = tmp_path_factory.mktemp("rf")
    write_csv(small_data(), root / "inter.csv")
    (root / "cfg.toml").write_text(RUN_CONFIG)
    out = root / "run"
    assert main(["train", str(root / "inter.csv"), "--out", str(out), "--config",
                 str(root / "cfg.toml"), "--seed", "5", "--quiet"]) == 0
    return root, out


def test_deploy_ships_what_evaluate_measured(file_run, capsys) -> None:
    """[deploy] similarity/weighting reach `peel deploy`: a user's package ranks exactly as
    `peel evaluate` ranked that user."""
    root, out = file_run
    run = peel.Run.load(out)
    measured = run.rankings("1MB")
    user = sorted(measured)[3]
    pkg = root / "u.peel"
    assert main(["deploy", str(out), "--budget", "1MB", "--user", str(user), "--out",
                 str(pkg)]) == 0
    capsys.readouterr()
    assert main(["recommend", str(pkg), "--k", "20", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    shipped = peel.open_package(pkg)
    assert (shipped.similarity, shipped.weighting) == ("literal", "alpha")
    assert rec["items"] == measured[user].tolist()
    # the Python API ships the same package
    assert run.package("1MB", user=user).rank(k=20).items.tolist() == rec["items"]


def test_k_from_the_config_sets_ranked_lists_and_cutoffs(file_run, capsys) -> None:
    _, out = file_run
    assert main(["evaluate", str(out), "--json", "--quiet"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(set(r["metrics"]) == {"recall@20", "ndcg@20"} for r in rows)
    assert all(len(items) <= 20 for items in peel.Run.load(out).rankings("0.5").values())


def test_baselines_by_name_include_lightgcn_svd(file_run, capsys) -> None:
    _, out = file_run
    assert main(["evaluate", str(out), "--baselines", "lightgcn-svd", "--budgets", "0.5",
                 "--json", "--quiet"]) == 0
    rows = json.loads(capsys.readouterr().out)
    svd = [r for r in rows if r["method"] == "lightgcn-svd"]
    assert len(svd) == 1 and {r["method"] for r in rows} == {"PEEL", "lightgcn-svd"}
    n_items = peel.Run.load(out).data.n_items
    dim = svd[0]["detail"]["dim"]
    assert svd[0]["bytes_used"] == (n_items + 1) * dim * 4 <= svd[0]["budget_bytes"]
    assert main(["evaluate", str(out), "--baselines", "pmf,nope", "--quiet"]) == 2
    assert "nope" in capsys.readouterr().err
    assert "lightgcn-svd" in peel.RunConfig().deploy.baselines


def test_changed_data_file_is_refused_naming_it(file_run, capsys) -> None:
    root, out = file_run
    path = root / "inter.csv"
    original = path.read_bytes()
    lines = original.decode().splitlines()
    try:
        path.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")  # same rows
        for argv in (["evaluate", str(out), "--quiet"],
                     ["deploy", str(out), "--budget", "0.5", "--user", "3", "--out",
                      str(root / "x.peel")]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert "inter.csv" in err and "changed since" in err and "Traceback" not in err
        assert not (root / "x.peel").exists()
    finally:
        path.write_bytes(original)
    assert peel.Run.load(out).data.n_users > 0


def test_incomplete_run_is_refused_unless_partial(file_run, tmp_path, capsys) -> None:
    _, out = file_run
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    (cut / "groups" / "group_001.npz").unlink()
    with pytest.raises(RunFolderError, match=r"missing groups: 1\b"):
        evaluate(cut)
    for argv in (["evaluate", str(cut), "--quiet"],
                 ["deploy", str(cut), "--budget", "0.5", "--group", "0", "--out",
                  str(tmp_path / "g.peel")],
                 ["report", str(cut), "--out", str(tmp_path / "rep")]):
        assert main(argv) == 2
        assert "missing groups: 1" in capsys.readouterr().err
    rows = evaluate(cut, ["0.5"], progress=False, partial=True)
    assert rows and all(r.detail["partial"] and r.detail["missing_groups"] == [1] for r in rows)
    assert main(["report", str(cut), "--out", str(tmp_path / "rep"), "--partial"]) == 0


def test_in_memory_data_round_trips_through_fit_and_evaluate(tmp_path) -> None:
    """Also a catalogue under 50 items: metrics stop at the catalogue's size."""
    data = small_data(seed=7, n_items=40)
    cfg = peel.load_config(None, ["run.workers=1", "pretrain.dim=32", "pretrain.layers=1",
                                  "pretrain.epochs=2", "groups.n_user_groups=2",
                                  "groups.n_item_groups=4", "finetune.n_blocks=4",
                                  "finetune.max_epochs=1", "deploy.budgets=1.0"])
    train(cfg, tmp_path / "run", progress=False, data=data)
    assert load_run_config(tmp_path / "run").run.data == "stored"
    run = peel.Run.load(tmp_path / "run")
    assert run.data.n_users == data.n_users and (run.data.train != data.train).nnz == 0
    rows = run.evaluate(baselines=["lightgcn-svd"])
    assert {r.method for r in rows} == {"PEEL", "lightgcn-svd"}
    n = data.n_items
    for r in rows:
        assert set(r.metrics) == {"recall@20", "ndcg@20", f"recall@{n}", f"ndcg@{n}"}
        assert r.bytes_used <= r.budget_bytes
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["dataset"] == data.name


@pytest.mark.parametrize(("pair", "expected"), [
    ("data.header=ture", "a bool"), ("deploy.k=2.5", "an integer"),
    ("groups.n_user_groups=two", "an integer")])
def test_strict_overrides(pair: str, expected: str, tmp_path, capsys) -> None:
    key = pair.split("=")[0]
    assert main(["train", "demo", "--out", str(tmp_path / "r"), "--set", pair]) == 2
    err = capsys.readouterr().err
    assert key in err and expected in err and err.count("\n") == 1
    with pytest.raises(ValueError, match=key):
        peel.load_config(None, [pair])


def test_library_errors_speak_of_arguments() -> None:
    from peel.package import build_package, synthetic_group

    with pytest.raises(ValueError) as err:
        build_package("/nonexistent/x.peel", synthetic_group(n_items=50), 100)
    assert "--" not in str(err.value)


def test_one_of_each() -> None:
    """One full_table_bytes, one group-file reader (package's name delegates)."""
    from peel import budget, package, pipeline, runfolder

    assert pipeline.full_table_bytes is budget.full_table_bytes
    assert package.load_group is runfolder.load_group
    assert np.array_equal(runfolder.group_paths("r", 3)[0].parts[-2:], ["groups",
                                                                        "group_003.npz"])
