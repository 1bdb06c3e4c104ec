"""`peel experiment dynamic / latency / sweep` on a tiny generated run (seconds each)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from peel import pipeline
from peel.cli import main
from peel.experiments import (
    DynamicConfig,
    LatencyConfig,
    accumulate,
    held_block_bytes,
    peel_dynamic,
)
from peel.synthetic import SyntheticConfig, make_demo, write_lightgcn_folder

TINY_CONFIG = """
[run]
workers = 1

[pretrain]
dim = 32
block_dim = 8
layers = 1
epochs = 2
batch_size = 2048
patience = 1

[groups]
n_user_groups = 2
n_item_groups = 3

[finetune]
n_blocks = 4
block_dim = 8
max_epochs = 1
patience = 1
eval_users = 100

[deploy]
budgets = ["0.4", "0.8"]
baselines = ["lightgcn-svd"]
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    data = make_demo(SyntheticConfig(n_users=200, n_items=120, n_communities=3, n_topics=6,
                                     mean_interactions=20, seed=3))
    write_lightgcn_folder(data, str(root / "data"))
    (root / "cfg.toml").write_text(TINY_CONFIG)
    out = root / "run"
    assert main(["train", str(root / "data"), "--out", str(out), "--config",
                 str(root / "cfg.toml"), "--seed", "1", "--quiet"]) == 0
    return root, out


def _loaded(run):
    cfg = pipeline.load_run_config(run)
    return cfg, pipeline.run_data(run, cfg)


@pytest.mark.parametrize("split", ["test", "valid"])
def test_shrunk_and_regrown_packages_rank_like_a_fresh_deploy(tiny_run, split):
    """Every step of the chain (deploy, shrink, shrink, server round trip) gives each user
    exactly the metrics of a package deployed directly at that budget."""
    _, run = tiny_run
    cfg, data = _loaded(run)
    budgets = ["0.8", "0.5", "0.3", "0.8"]
    steps = peel_dynamic(run, data, cfg, budgets, split, reps=1)
    assert [s.action for s in steps] == ["deploy (server)", "shrink on device",
                                         "shrink on device", "server round trip"]
    for step in steps:
        fresh: dict = {}
        pipeline.evaluate_peel(run, data, cfg, [step.budget], split, per_user_out=fresh)
        want = fresh[step.budget]
        order = np.argsort(want["users"])
        got = np.argsort(step.users)
        assert np.array_equal(step.users[got], want["users"][order])
        for key in ("recall@20", "ndcg@20"):
            assert np.array_equal(step.per_user[key][got], want[key][order]), (step.step, key)
        assert step.bytes_used <= step.budget_bytes


def test_download_counts_only_the_missing_blocks(tiny_run):
    _, run = tiny_run
    cfg, data = _loaded(run)
    steps = peel_dynamic(run, data, cfg, ["0.8", "0.3", "0.8"], "test", reps=1)
    first, shrunk, grown = steps
    assert first.download_bytes == first.full_download_bytes > 0
    assert shrunk.download_bytes == 0 and shrunk.seconds < 0.5
    # the grown package is the first one again; the device still holds the small prefix
    assert grown.full_download_bytes == first.full_download_bytes
    assert 0 < grown.download_bytes < grown.full_download_bytes
    assert grown.detail["download_bytes_sum"] < grown.detail["full_package_bytes_sum"]


def test_held_block_bytes_is_the_common_prefix(tiny_run, tmp_path):
    from peel import runfolder
    from peel.device import open_package
    from peel.package import build_package

    _, run = tiny_run
    cfg, _ = _loaded(run)
    arrays = runfolder.load_group(run, 0)
    options = pipeline.deploy_options(cfg)
    build_package(tmp_path / "big.peel", arrays, "0.8", options=options)
    build_package(tmp_path / "small.peel", arrays, "0.3", options=options)
    big, small = open_package(tmp_path / "big.peel"), open_package(tmp_path / "small.peel")
    assert held_block_bytes(small, big) == small.blocks.nbytes
    assert held_block_bytes(big, big) == big.blocks.nbytes
    assert held_block_bytes(small, small) == small.blocks.nbytes
    # what the device keeps is byte for byte the start of the bigger package's blocks
    held = held_block_bytes(small, big)
    as_bytes = [np.frombuffer(p.blocks.tobytes(), dtype=np.uint8) for p in (small, big)]
    assert np.array_equal(as_bytes[0][:held], as_bytes[1][:held])


def test_accumulated_time_adds_recorded_training_once(tiny_run):
    _, run = tiny_run
    cfg, data = _loaded(run)
    steps = peel_dynamic(run, data, cfg, ["0.8", "0.3"], "test", reps=1)
    assert steps[0].recorded_seconds > 0 and steps[1].recorded_seconds == 0
    rows = accumulate(steps)
    assert rows[-1]["accumulated_seconds"] == pytest.approx(
        sum(s.seconds + s.recorded_seconds for s in steps))
    assert rows[-1]["accumulated_after_first_seconds"] == pytest.approx(steps[1].seconds)


def test_dynamic_config_refuses_bad_input():
    with pytest.raises(ValueError, match="at least two"):
        DynamicConfig(budgets=("0.5",)).validate()
    with pytest.raises(ValueError, match="unknown baseline"):
        DynamicConfig(baselines=("nope",)).validate()


def test_cli_dynamic_writes_the_report(tiny_run, capsys):
    root, run = tiny_run
    out = root / "dyn"
    code = main(["experiment", "dynamic", str(run), "--budgets", "0.8,0.4,0.8",
                 "--baselines", "lightgcn-svd", "--out", str(out), "--quiet", "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["method"] for r in rows} == {"PEEL", "lightgcn-svd"}
    svd = [r for r in rows if r["method"] == "lightgcn-svd"]
    assert [r["action"] for r in svd] == ["rotate stage 1 + truncate", "re-truncate",
                                        "re-truncate"]
    assert all(r["download_bytes"] == r["bytes_used"] for r in svd)
    for r in rows:
        assert 0 <= r["recall@20"] <= 1 and r["bytes_used"] <= r["budget_bytes"]
    acc = [r["accumulated_seconds"] for r in rows if r["method"] == "PEEL"]
    assert acc == sorted(acc)
    md = (out / "report.md").read_text()
    assert "Command: `peel experiment dynamic" in md and "Machine:" in md
    with open(out / "dynamic.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 6
    meta = json.loads((out / "dynamic.json").read_text())["meta"]
    assert set(meta["stages"]) == {"load run and data", "PEEL", "lightgcn-svd"}
    pytest.importorskip("matplotlib")
    assert (out / "dynamic.png").stat().st_size > 1000


def test_truncations_re_truncate_and_count_stage_one(tiny_run):
    """Every lightgcn-svd variant re-truncates (no retraining) and its first deployment
    carries stage 1's recorded time; a retrained model does not."""
    from peel.experiments import baseline_actions, baseline_dynamic, builds_on_stage1

    assert baseline_actions("lightgcn-svd-int4") == baseline_actions("lightgcn-svd") == (
        "rotate stage 1 + truncate", "re-truncate")
    assert baseline_actions("rule") == ("search (server)", "new search")
    assert baseline_actions("lightgcn-int8") == ("train (server)", "retrain")
    assert builds_on_stage1("lightrec") and not builds_on_stage1("bpr-mf")
    _, run = tiny_run
    cfg, data = _loaded(run)
    steps = baseline_dynamic("lightgcn-svd-int4", run, data, cfg, ["0.8", "0.4"], "test")
    assert [s.action for s in steps] == ["rotate stage 1 + truncate", "re-truncate"]
    assert steps[0].recorded_seconds > 0 and steps[1].recorded_seconds == 0


def test_dynamic_from_eval_reuses_evaluates_fits(tiny_run, tmp_path, capsys):
    """--from-eval takes a baseline's steps from RUN/eval.json: the same metrics a refit
    gives (fits are deterministic for the seed), evaluate's seconds; a budget eval.json
    lacks means fitting here."""
    import shutil

    from peel.experiments import baseline_dynamic, dynamic

    _, base = tiny_run
    run = tmp_path / "run"
    shutil.copytree(base, run)
    assert main(["evaluate", str(run), "--baselines", "bpr-mf", "--budgets", "0.8,0.4",
                 "--quiet"]) == 0
    capsys.readouterr()
    saved = {r["budget"]: r for r in json.loads((run / "eval.json").read_text())["rows"]
             if r["method"] == "BPR-MF"}
    info = dynamic(run, tmp_path / "dyn", DynamicConfig(
        budgets=("0.8", "0.4", "0.8"), baselines=("bpr-mf",), shrink_reps=1, from_eval=True))
    steps = [r for r in info["rows"] if r["method"] == "BPR-MF"]
    assert [r["detail"]["timed_by"] for r in steps] == ["peel evaluate (eval.json)"] * 3
    assert [r["seconds"] for r in steps] == [saved[b]["detail"]["seconds"]
                                             for b in ("0.8", "0.4", "0.8")]
    cfg, data = _loaded(run)
    refit = baseline_dynamic("bpr-mf", run, data, cfg, ["0.8", "0.4"], "test")
    for step, fresh in zip(steps[:2], refit, strict=True):
        assert step["recall@20"] == pytest.approx(fresh.metrics["recall@20"])
        assert step["bytes_used"] == fresh.bytes_used
    assert "--from-eval" in (tmp_path / "dyn" / "report.md").read_text()
    again = dynamic(run, tmp_path / "dyn2", DynamicConfig(
        budgets=("0.8", "0.3"), baselines=("bpr-mf",), shrink_reps=1, from_eval=True))
    assert all("timed_by" not in r["detail"] for r in again["rows"]
               if r["method"] == "BPR-MF")


def test_cli_dynamic_bad_baseline_is_one_line(tiny_run, capsys):
    root, run = tiny_run
    code = main(["experiment", "dynamic", str(run), "--baselines", "nope",
                 "--out", str(root / "bad"), "--quiet"])
    assert code == 2
    assert "unknown baseline" in capsys.readouterr().err


# --------------------------------------------------------------------------- latency


def test_cli_latency_times_every_method_on_both_devices(tiny_run, capsys):
    root, run = tiny_run
    out = root / "lat"
    code = main(["experiment", "latency", str(run), "--budgets", "0.8", "--users", "20",
                 "--baselines", "lightgcn-svd", "--out", str(out), "--quiet", "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["device"], r["method"], r["budget"]) for r in rows} == {
        (d, m, b) for d in ("iot", "cellphone") for m in ("PEEL", "lightgcn-svd")
        for b in ("0.8",)}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["p99_ms"] >= r["p50_ms"] > 0 and r["floor_p50_ms"] > 0
        assert r["ratio"] == pytest.approx(r["p50_ms"] / r["floor_p50_ms"])
        assert 300 > r["peak_rss_mb"] >= r["rss_before_model_mb"] > 0  # not pytest's peak
        assert r["worker"]["imports"] == {"torch": False, "scipy": False}
        assert r["worker"]["cap"] == "RLIMIT_AS"
        assert len(r["worker"]["cpus"]) == min(r["threads"], len(r["worker"]["cpus"]) or 1)
    md = (out / "report.md").read_text()
    assert "RLIMIT_AS" in md and "Command: `peel experiment latency" in md
    assert (out / "latency.csv").exists()
    pytest.importorskip("matplotlib")
    assert (out / "latency.png").stat().st_size > 1000


def test_the_memory_cap_is_enforced(tmp_path):
    """A floor of 100 MB does not fit the IoT device's 64 MB; it does fit a cellphone's."""
    from dataclasses import asdict

    from peel.experiments import run_worker
    from peel.latency import DEVICES

    base = {"kind": "floor", "nbytes": 100 * 2**20, "n_items": 1000, "k": 10, "n_users": 2,
            "warmup": 0}
    iot = run_worker({**base, "device": asdict(DEVICES["iot"])}, tmp_path, "iot")
    assert iot["status"].startswith("failed under the 64 MB cap"), iot
    phone = run_worker({**base, "device": asdict(DEVICES["cellphone"])}, tmp_path, "phone")
    assert phone["status"] == "ok" and phone["peak_rss_mb"] > 100


def test_latency_fit_epochs_caps_the_baselines_training(tiny_run, monkeypatch):
    """--fit-epochs reaches every baseline's config, and the report says so."""
    import peel.baselines as baselines
    from peel.experiments import latency

    root, run = tiny_run
    seen = []
    real = baselines.make_baseline

    def spy(name, config, **kw):
        seen.append((name, config.epochs))
        return real(name, config, **kw)

    monkeypatch.setattr(baselines, "make_baseline", spy)
    info = latency(run, root / "lat_capped", LatencyConfig(
        budgets=("0.8",), baselines=("bpr-mf", "esapn"), users=5, devices=("iot",),
        warmup=0, fit_epochs=1))
    assert seen == [("bpr-mf", 1), ("esapn", 1)]
    assert {r["method"] for r in info["rows"] if r["status"] == "ok"} == {
        "PEEL", "BPR-MF", "ESAPN"}
    assert "at most 1 epoch(s)" in (root / "lat_capped" / "report.md").read_text()
    with pytest.raises(ValueError, match="--fit-epochs"):
        LatencyConfig(fit_epochs=0).validate()


def test_latency_config_refuses_unknown_devices():
    with pytest.raises(ValueError, match="--devices"):
        LatencyConfig(devices=("watch",)).validate()


# --------------------------------------------------------------------------- sweep


def test_cli_sweep_reuses_stage_one_and_resumes(tiny_run, capsys):
    """G_v = 3 is the base run itself; G_v = 2 trains groups and stage 2 on the base run's
    stage 1; a second call trains nothing."""
    root, run = tiny_run
    out = root / "sweep"
    argv = ["experiment", "sweep", str(run), "--param", "groups.n_item_groups=2,3",
            "--budget", "0.5", "--out", str(out), "--quiet", "--json"]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["value"] for r in rows] == ["2", "3"]
    new, base = rows
    assert new["reused_stage1"] and not new["same_as_base_run"]
    assert base["same_as_base_run"] and base["run"] == str(run)
    folder = out / "runs" / "groups.n_item_groups=2"
    assert (folder / "pretrain" / "embeddings.safetensors").read_bytes() == (
        run / "pretrain" / "embeddings.safetensors").read_bytes()
    assert pipeline.load_run_config(folder).groups.n_item_groups == 2
    for r in rows:
        assert r["bytes_used"] <= r["budget_bytes"]
        for split in ("valid", "test"):
            assert 0 <= r[split]["recall@50"] <= 1 and 0 <= r[split]["ndcg@50"] <= 1
    stamp = (folder / "sweep_result.json").stat().st_mtime_ns
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert all(r["resumed_from_saved"] for r in again)
    assert (folder / "sweep_result.json").stat().st_mtime_ns == stamp
    assert [r["valid"] for r in again] == [r["valid"] for r in rows]
    md = (out / "report.md").read_text()
    assert "groups.n_item_groups" in md and "Command: `peel experiment sweep" in md
    csv = (out / "sweep.csv").read_text().splitlines()
    cols = csv[0].split(",")
    cells = [dict(zip(cols, line.split(","), strict=True)) for line in csv[1:]]
    assert cells[1]["train_seconds"] == ""  # the base run's value: nothing trained here
    assert float(cells[0]["train_seconds"]) > 0
    assert float(cells[0]["finetune_seconds_recorded"]) > 0
    pytest.importorskip("matplotlib")
    assert (out / "groups_n_item_groups.png").stat().st_size > 1000


def test_sweep_over_blocks_trains_its_own_stage_one(tiny_run):
    from peel.experiments import SweepConfig, sweep

    root, run = tiny_run
    info = sweep(run, root / "sweep_n", SweepConfig("finetune.n_blocks", ("2",), "0.5"))
    row = info["rows"][0]
    assert not row["reused_stage1"] and row["full_dim"] == 16
    cfg = pipeline.load_run_config(row["run"])
    assert cfg.pretrain.dim == 16 and cfg.finetune.n_blocks == 2
    assert row["bytes_used"] <= row["budget_bytes"]


def test_sweep_refuses_bad_parameters(tiny_run, capsys):
    from peel.experiments import parse_param

    with pytest.raises(ValueError, match=r"SECTION\.KEY"):
        parse_param("n_item_groups")
    root, run = tiny_run
    code = main(["experiment", "sweep", str(run), "--param", "groups.nope=1,2",
                 "--out", str(root / "bad_sweep"), "--quiet"])
    assert code == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["lightgcn-svd", "dlrm-ce", "lightrec", "esapn", "autoemb",
                                  "lightgcn-int8", "lightgcn-svd-fp16",
                                  "lightgcn-svd-int4"])
def test_worker_ranks_as_the_method_does(tiny_run, tmp_path, name):
    """What the device process times is the method's own ranking (same top-k)."""
    from dataclasses import asdict

    from peel.baselines import make_baseline
    from peel.budget import full_table_bytes, parse_budget
    from peel.experiments import baseline_device_model, run_worker, time_device_model
    from peel.latency import DEVICES

    _, run = tiny_run
    cfg, data = _loaded(run)
    users = np.flatnonzero(data.test.getnnz(axis=1) > 0)[:3]
    exclude = data.seen_matrix("test")[users]
    model = make_baseline(name, cfg.pretrain, run=run)
    model.fit(data, parse_budget("0.8", full_table_bytes(data.n_items, cfg.pretrain.dim)))
    dm = baseline_device_model(model, "0.8", users, exclude, tmp_path)
    spec = {"device": asdict(DEVICES["iot"]), "k": 10, "n_users": 3, "warmup": 0,
            "n_items": data.n_items, "kind": dm.kind, "model": str(dm.model),
            "users": str(dm.users), **dm.extra}
    result = run_worker(spec, tmp_path, name)
    assert result["status"] == "ok", result
    assert result["first_user_items"] == model.rank(users[:1], k=10, split="test")[0].tolist()
    row = time_device_model(dm, DEVICES["iot"], 3, data.n_items, LatencyConfig(k=10), tmp_path)
    assert row["status"] == "ok" and row["floor_p50_ms"] > 0


def test_worker_ranks_peel_as_the_package_does(tiny_run, tmp_path):
    from dataclasses import asdict

    from peel.api import Run
    from peel.experiments import latency_users, peel_device_model, run_worker
    from peel.latency import DEVICES

    _, run = tiny_run
    cfg, data = _loaded(run)
    group, users = latency_users(run, data, "test", 3, seed=0)
    exclude = data.seen_matrix("test")[users]
    dm = peel_device_model(run, cfg, group, users, exclude, "0.5", tmp_path)
    spec = {"device": asdict(DEVICES["iot"]), "k": 10, "n_users": len(users), "warmup": 0,
            "n_items": data.n_items, "kind": dm.kind, "model": str(dm.model),
            "users": str(dm.users)}
    result = run_worker(spec, tmp_path, "peel")
    assert result["status"] == "ok", result
    from peel import runfolder

    arrays = runfolder.load_group(run, group)
    vector = arrays.user_emb[arrays.user_row(int(users[0]))]
    pkg = Run.load(run).package("0.5", group=group)
    want = pkg.rank(vector, k=10, exclude=exclude[0].indices).items.tolist()
    assert result["first_user_items"] == want


def test_a_fixed_size_baseline_retrains_at_every_change(tiny_run):
    from peel.experiments import baseline_dynamic

    _, run = tiny_run
    cfg, data = _loaded(run)
    steps = baseline_dynamic("bpr-mf", run, data, cfg, ["0.8", "0.4", "0.8"], "test")
    assert [s.action for s in steps] == ["train (server)", "retrain", "retrain"]
    assert all(s.seconds > 0 and s.download_bytes == s.bytes_used > 0 for s in steps)
    assert steps[0].recorded_seconds == 0  # trained here, nothing recorded to add
    assert steps[1].detail["dim"] < steps[0].detail["dim"] == steps[2].detail["dim"]
    assert steps[2].metrics == steps[0].metrics  # the same budget retrains the same model


def test_worker_ranks_rule_as_its_package_does(tiny_run, tmp_path):
    from dataclasses import asdict

    from peel.baselines import Rule, RuleConfig
    from peel.budget import full_table_bytes, parse_budget
    from peel.experiments import baseline_device_model, run_worker
    from peel.latency import DEVICES

    _, run = tiny_run
    cfg, data = _loaded(run)
    model = Rule.from_run(run, cfg.pretrain, RuleConfig(n_configs=30, eval_users=50, cycles=3))
    model.fit(data, parse_budget("0.5", full_table_bytes(data.n_items, cfg.pretrain.dim)))
    users = np.flatnonzero(data.test.getnnz(axis=1) > 0)[:3]
    dm = baseline_device_model(model, "0.5", users, data.seen_matrix("test")[users], tmp_path)
    assert dm.kind == "package"
    spec = {"device": asdict(DEVICES["iot"]), "k": 10, "n_users": 3, "warmup": 0,
            "n_items": data.n_items, "kind": dm.kind, "model": str(dm.model),
            "users": str(dm.users)}
    result = run_worker(spec, tmp_path, "rule")
    assert result["status"] == "ok", result
    assert result["first_user_items"] == model.rank(users[:1], k=10, split="test")[0].tolist()
