"""End to end: `peel train`, `peel evaluate`, `peel report` on a small generated dataset."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from peel.cli import main
from peel.io import write_json
from peel.package import DEFAULT_PRECISION
from peel.pipeline import _check_pretrain_config, config_toml, demo_config, load_run_config
from peel.synthetic import SyntheticConfig, make_demo, write_lightgcn_folder

SMALL_CONFIG = """
[run]
label = "PEEL"
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
max_epochs = 2
patience = 1
eval_users = 100

[deploy]
budgets = ["0.4", "0.8"]
baselines = ["pmf"]
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    data = make_demo(SyntheticConfig(n_users=240, n_items=160, n_communities=3, n_topics=6,
                                     mean_interactions=20, seed=4))
    write_lightgcn_folder(data, str(root / "data"))
    (root / "cfg.toml").write_text(SMALL_CONFIG)
    out = root / "run"
    code = main(["train", str(root / "data"), "--out", str(out), "--config",
                 str(root / "cfg.toml"), "--seed", "5", "--quiet"])
    assert code == 0
    return root, out


def test_train_writes_every_stage(run_dir):
    _, out = run_dir
    for name in ("config.toml", "run.json", "pretrain/embeddings.safetensors",
                 "partition.npz", "train_summary.json"):
        assert (out / name).exists(), name
    assert len(list((out / "groups").glob("group_*.npz"))) == 3
    cfg = load_run_config(out)
    assert cfg.run.seed == 5 and cfg.pretrain.seed == 5 and cfg.groups.n_user_groups == 3


def test_train_resumes_without_redoing_work(run_dir, capsys):
    root, out = run_dir
    before = {p.name: p.stat().st_mtime_ns for p in (out / "groups").glob("*.npz")}
    code = main(["train", str(root / "data"), "--out", str(out), "--config",
                 str(root / "cfg.toml"), "--seed", "5", "--quiet", "--json"])
    assert code == 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / "groups").glob("*.npz")}
    assert before == after
    summary = json.loads((out / "train_summary.json").read_text())
    history = json.loads((out / "pretrain" / "pretrain_log.json").read_text())["history"]
    # the resumed call spent ~0 s in stage 1; the cumulative figure still reports its cost
    assert summary["pretrain_seconds_all_sessions"] == history[-1]["elapsed"] > 0


def test_train_refuses_a_different_config_in_same_folder(run_dir, capsys):
    root, out = run_dir
    code = main(["train", str(root / "data"), "--out", str(out), "--config",
                 str(root / "cfg.toml"), "--seed", "6", "--quiet"])
    assert code == 2
    assert "different configuration" in capsys.readouterr().err


def test_train_resumes_with_another_epoch_cap(run_dir, capsys):
    """Extending stage 1's epoch cap or patience resumes the run (same stages, same files)
    instead of refusing it; what stage 1 learns (lr, negatives, ...) still may not change."""
    root, out = run_dir
    before = {p.name: p.stat().st_mtime_ns for p in (out / "groups").glob("*.npz")}
    common = ["train", str(root / "data"), "--out", str(out), "--config",
              str(root / "cfg.toml"), "--seed", "5", "--quiet"]
    assert main([*common, "--set", "pretrain.epochs=500", "--set", "pretrain.patience=9"]) == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "groups").glob("*.npz")}
    assert main([*common, "--set", "pretrain.lr=0.123"]) == 2
    assert "different configuration" in capsys.readouterr().err


def test_evaluate_and_report(run_dir, capsys):
    root, out = run_dir
    code = main(["evaluate", str(out), "--baselines", "--selection", "random", "--scale",
                 "eq10", "--precision", "fp32", "--json", "--quiet"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    methods = {r["method"] for r in rows}
    assert methods == {"PEEL", "PEEL (selection=random)", "PEEL (scale=eq10)",
                       "PEEL (precision=fp32)", "PMF"}
    for r in rows:
        assert r["bytes_used"] <= r["budget_bytes"]
        for v in r["metrics"].values():
            assert 0.0 <= v <= 1.0
    peel_rows = sorted((r for r in rows if r["method"] == "PEEL"),
                       key=lambda r: r["budget_bytes"])
    assert peel_rows[0]["budget_bytes"] < peel_rows[1]["budget_bytes"]
    code = main(["report", str(out), "--out", str(root / "report")])
    assert code == 0
    md = (root / "report" / "results.md").read_text()
    assert "PEEL" in md and "PMF" in md
    assert (root / "report" / "results.csv").exists()
    assert (root / "report" / "recall50.png").exists()


def test_tuned_baselines_reference_rows_and_what_the_report_writes(run_dir, capsys):
    """--tune-trials records the validation choice in each baseline row; --reference adds the
    every-block and pretrained rows; the report writes stages, blocks kept and settings."""
    import csv

    root, out = run_dir
    assert main(["evaluate", str(out), "--tune-trials", "2", "--quiet"]) == 2
    assert "--baselines" in capsys.readouterr().err
    code = main(["evaluate", str(out), "--baselines", "pmf,bpr-mf,lightgcn-svd", "--budgets",
                 "0.4", "--tune-trials", "2", "--reference", "--json", "--quiet"])
    assert code == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"PMF", "BPR-MF", "lightgcn-svd", "PEEL (every block)", "pretrained (32-d)"} <= set(
        rows)
    for name in ("PMF", "BPR-MF"):
        tuning = rows[name]["detail"]["tuning"]
        recalls = [t["valid_recall@20"] for t in tuning["log"]]
        assert tuning["trials"] == 2 and tuning["chosen_trial"] == recalls.index(max(recalls))
    assert "nothing to tune" in rows["lightgcn-svd"]["detail"]["tuning"]["note"]
    for name in ("PEEL (every block)", "pretrained (32-d)"):
        assert rows[name]["budget"] == "all"
        assert rows[name]["bytes_used"] <= rows[name]["budget_bytes"]
    kept = rows["PEEL"]["detail"]["blocks_per_item_group"]
    assert len(kept) == 3 and all(len(c) == 4 and min(c) >= 1 for c in kept.values())
    assert all(c == [4, 4, 4, 4] for c in rows["PEEL (every block)"]["detail"][
        "blocks_per_item_group"].values())

    report = root / "report_tuned"
    assert main(["report", str(out), "--out", str(report)]) == 0
    capsys.readouterr()
    summary = json.loads((out / "train_summary.json").read_text())
    stages = list(csv.DictReader((report / "stages.csv").open()))
    assert float(stages[0]["pretrain_s"]) == pytest.approx(summary["seconds"]["pretrain"],
                                                           abs=1e-6)  # CSV: 6 places
    from peel.runfolder import chosen_precision

    assert stages[0]["precision_rule"] == (chosen_precision(out) or "")  # the run's "auto"
    assert float(stages[0]["precision_s"]) == pytest.approx(summary["seconds"]["precision"],
                                                            abs=1e-6)
    hyper = {(r["method"], r["budget"]): r
             for r in csv.DictReader((report / "hyperparameters.csv").open())}
    assert hyper[("PMF", "0.4")]["tuned"] == "yes"
    assert json.loads(hyper[("PMF", "0.4")]["chosen"]) == rows["PMF"]["detail"]["tuning"][
        "chosen"]
    blocks = list(csv.DictReader((report / "blocks.csv").open()))
    assert {(r["user_group"], r["item_group"]) for r in blocks
            if r["method"] == "PEEL" and r["budget"] == "0.4"} == {
        (str(g), str(i)) for g in range(3) for i in range(4)}
    md = (report / "results.md").read_text()
    assert "Stage timings" in md and "Blocks kept" in md and "hyper-parameters" in md
    assert "pretrained (32-d)" in md


def test_precision_flags_of_deploy_and_evaluate(run_dir, capsys):
    root, out = run_dir
    from peel.runfolder import chosen_precision

    auto = chosen_precision(out) or DEFAULT_PRECISION  # the run's choice on validation
    versions = {"fp32": 3, "int8": 4, "int4": 5, "int4s": 6, "int8s": 6, "int4r0": 7,
                "int4r25": 7, "int4r50": 7, "int4r100": 7}
    for precision, version in (("fp32", 3), ("int8", 4), ("auto", versions[auto]), ("int4", 5),
                               ("int4s", 6), ("int4r50", 7)):
        pkg = root / f"g0_{precision}.peel"
        assert main(["deploy", str(out), "--budget", "0.6", "--group", "0", "--out", str(pkg),
                     "--precision", precision, "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["format_version"] == version
        assert info["precision"] == (auto if precision == "auto" else precision)
    assert main(["evaluate", str(out), "--precision", "fp32,int2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "'int2'" in err and "Traceback" not in err


def test_set_override_validation(capsys, tmp_path):
    code = main(["train", "demo", "--out", str(tmp_path / "r"), "--set", "groups.nope=1"])
    assert code == 2 and "has no key 'nope'" in capsys.readouterr().err


def test_deploy_user_package_excludes_seen_items_and_shrinks(run_dir, capsys):
    from peel.pipeline import load_data

    root, out = run_dir
    data = load_data(load_run_config(out))
    user = 7
    pkg = root / "u7.peel"
    assert main(["deploy", str(out), "--budget", "0.8", "--user", str(user), "--out", str(pkg),
                 "--json"]) == 0
    capsys.readouterr()
    assert main(["recommend", str(pkg), "--k", "20", "--budget", "0.4", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    seen = set(data.seen_matrix("test")[user].indices.tolist())
    assert len(rec["items"]) == 20 and not seen & set(rec["items"])
    assert rec["ids"] == [int(data.item_ids[i]) for i in rec["items"]]
    small = root / "u7-small.peel"
    assert main(["shrink", str(pkg), "--budget", "0.4", "--out", str(small)]) == 0
    assert small.stat().st_size < pkg.stat().st_size


def test_reuse_pretrain_copies_stage1_only_for_identical_settings(tmp_path: Path) -> None:
    from dataclasses import replace

    from peel.pipeline import reuse_pretrain

    src = tmp_path / "src"
    (src / "pretrain").mkdir(parents=True)
    cfg = demo_config(0)
    (src / "config.toml").write_text(config_toml(cfg))
    for name in ("embeddings.safetensors", "pretrain_log.json"):
        (src / "pretrain" / name).write_bytes(b"x")
    write_json(src / "pretrain" / "pretrain_config.json", asdict(cfg.pretrain))
    ablation = replace(cfg, groups=replace(cfg.groups, item_grouping="random"))
    reuse_pretrain(src, tmp_path / "ab", ablation)
    assert (tmp_path / "ab" / "pretrain" / "embeddings.safetensors").read_bytes() == b"x"
    other = replace(cfg, pretrain=replace(cfg.pretrain, diversity=0.0))
    with pytest.raises(ValueError, match="pretrain"):
        reuse_pretrain(src, tmp_path / "reg", other)
    with pytest.raises(ValueError, match="diversity"):
        _check_pretrain_config(tmp_path / "ab" / "pretrain", other.pretrain)


def test_stage1_made_before_a_setting_existed_counts_as_that_settings_default(
        tmp_path: Path) -> None:
    """Runs pretrained before ``nested_dims`` existed stay reusable at its default (their
    behaviour), and are refused when the setting asks for something they did not do."""
    from dataclasses import replace

    cfg = demo_config(0)
    stage = tmp_path / "pretrain"
    stage.mkdir()
    old = {k: v for k, v in asdict(cfg.pretrain).items() if k != "nested_dims"}
    write_json(stage / "pretrain_config.json", old)
    _check_pretrain_config(stage, cfg.pretrain)
    with pytest.raises(ValueError, match="nested_dims"):
        _check_pretrain_config(stage, replace(cfg.pretrain, nested_dims=(8,)))


def _stage_arrays(out: Path) -> dict[str, bytes]:
    import numpy as np

    arrays = {}
    for path in [*sorted((out / "groups").glob("group_*.npz")), out / "partition.npz"]:
        with np.load(path, allow_pickle=False) as z:
            arrays.update({f"{path.name}:{k}": z[k].tobytes() for k in z.files})
    arrays["embeddings"] = (out / "pretrain" / "embeddings.safetensors").read_bytes()
    return arrays


def test_same_seed_gives_identical_runs_with_parallel_workers(run_dir, capsys):
    """Reproducibility promise: two runs of one command agree bit for bit, workers included."""
    root, first = run_dir
    runs = []
    for name in ("det_a", "det_b"):
        out = root / name
        assert main(["train", str(root / "data"), "--out", str(out), "--config",
                     str(root / "cfg.toml"), "--seed", "5", "--workers", "2", "--quiet"]) == 0
        capsys.readouterr()
        assert main(["evaluate", str(out), "--json", "--quiet"]) == 0
        rows = json.loads(capsys.readouterr().out)
        runs.append((_stage_arrays(out), [(r["method"], r["budget_bytes"], r["metrics"])
                                          for r in rows]))
    assert runs[0][0].keys() == runs[1][0].keys()
    assert all(runs[0][0][k] == runs[1][0][k] for k in runs[0][0])
    assert runs[0][1] == runs[1][1]
    # the worker count is a speed knob, not a result knob
    assert _stage_arrays(first) == runs[0][0]


def test_deploy_takes_the_runs_eq10_scale_and_rejects_unknown_ones(run_dir, capsys, tmp_path):
    from peel.device import open_package

    _, out = run_dir
    pkg = tmp_path / "g0.peel"
    assert main(["deploy", str(out), "--budget", "0.4", "--group", "0", "--out", str(pkg)]) == 0
    assert open_package(pkg).scale == load_run_config(out).finetune.scale == "none"
    assert main(["deploy", str(out), "--budget", "0.4", "--group", "0", "--out", str(pkg),
                 "--scale", "eq10"]) == 0
    assert open_package(pkg).scale == "eq10"
    capsys.readouterr()
    code = main(["train", "demo", "--out", str(tmp_path / "r"), "--set", "deploy.scale=max"])
    assert code == 2 and "deploy.scale" in capsys.readouterr().err


def test_the_paper_configuration_ships_with_the_library() -> None:
    """`peel train DATA --config paper` reads the shipped TOML: the paper's method as written."""
    from peel.pipeline import load_config

    cfg = load_config("paper")
    cfg.validate()
    assert (cfg.finetune.init, cfg.finetune.transform, cfg.finetune.importance) == (
        "pretrained", "eq4", "controller")
    assert (cfg.finetune.scorer, cfg.finetune.similarity, cfg.finetune.scale) == (
        "mlp", "literal", "eq10")
    assert cfg.finetune.train_budgets == ()
    assert (cfg.pretrain.layer_combination, cfg.pretrain.sampling, cfg.pretrain.lr) == (
        "last", "uniform", 1e-3)
    assert cfg.deploy.precision == "fp32"  # the paper counts 4 bytes per value (IV-D4)
    assert cfg.run.label == "PEEL (paper)"


def test_evaluate_baselines_rule_reuses_the_runs_stage1(run_dir, capsys, monkeypatch):
    """`peel evaluate RUN --baselines rule`: RULE on the run's embeddings and item groups."""
    import functools

    from peel.baselines import rule

    # fewer labelled configurations than the default 2,000, to keep the test short
    monkeypatch.setattr(rule, "RuleConfig", functools.partial(rule.RuleConfig, n_configs=100))
    _, out = run_dir
    code = main(["evaluate", str(out), "--baselines", "rule", "--split", "valid", "--json",
                 "--quiet"])
    assert code == 0
    rows = [r for r in json.loads(capsys.readouterr().out) if r["method"] == "RULE"]
    assert len(rows) == 2
    for r in rows:
        assert 0 < r["bytes_used"] <= r["budget_bytes"]
        assert r["detail"]["n_item_groups"] == load_run_config(out).groups.n_item_groups
        assert r["detail"]["stage1_seconds"] > 0  # the run's stage 1, not a retraining
        assert r["detail"]["configs_labelled"] == 100


def test_baselines_tuned_on_a_copy_without_groups_merge_back(run_dir, tmp_path, capsys):
    """--baselines-only needs the run's data and config alone (the copy a GPU machine gets);
    --merge adds that copy's rows to the run, and refuses rows from another split."""
    import shutil

    _, out = run_dir
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.toml", "run.json", "data.json", "partition.npz"):
        shutil.copy(out / name, copy / name)
    assert main(["evaluate", str(copy), "--baselines", "bpr-mf", "--budgets", "0.4",
                 "--tune-trials", "2", "--baselines-only", "--workers", "2", "--json",
                 "--quiet"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["BPR-MF"]  # no PEEL row: there are no groups
    assert rows[0]["detail"]["tuning"]["trials"] == 2
    assert main(["evaluate", str(copy), "--reference", "--baselines-only", "--quiet"]) == 2
    capsys.readouterr()

    before = json.loads((out / "eval.json").read_text())["rows"]
    assert main(["evaluate", str(out), "--merge", str(copy / "eval.json")]) == 0
    capsys.readouterr()
    after = json.loads((out / "eval.json").read_text())["rows"]
    merged = [r for r in after if (r["method"], r["budget"]) == ("BPR-MF", "0.4")]
    assert merged == rows
    assert {(r["method"], r["budget"]) for r in before} <= {(r["method"], r["budget"])
                                                           for r in after}

    other = json.loads((copy / "eval.json").read_text())
    other["split_digest"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["evaluate", str(out), "--merge", str(tmp_path / "other.json")]) == 2
    assert "split_digest" in capsys.readouterr().err
