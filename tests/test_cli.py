"""End-to-end tests of the command line on generated data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from peel.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_data_stats_json_on_demo(capsys):
    code, out, _ = run(capsys, "data", "stats", "demo", "--json")
    assert code == 0
    stats = json.loads(out)
    assert stats["users"] > 0 and stats["items"] > 0 and 0 < stats["density"] < 1


def test_data_stats_table_on_folder(capsys, tmp_path):
    (tmp_path / "train.txt").write_text("0 1 2\n1 0 2\n2 1\n")
    (tmp_path / "test.txt").write_text("0 0\n")
    code, out, _ = run(capsys, "data", "stats", str(tmp_path), "--no-cache")
    assert code == 0 and "interactions" in out


def test_bad_input_is_a_message_not_a_traceback(capsys, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item\n1\n")
    code, _, err = run(capsys, "data", "stats", str(bad), "--no-cache")
    assert code == 2
    assert "bad.csv:2" in err and "Traceback" not in err


def test_missing_path(capsys, tmp_path):
    code, _, err = run(capsys, "data", "stats", str(tmp_path / "nope"), "--no-cache")
    assert code == 2 and "no such file" in err


def test_pretrain_command_writes_outputs(capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = run(capsys, "pretrain", "demo", "--out", str(out), "--dim", "16",
                          "--layers", "1", "--epochs", "2", "--batch-size", "4096",
                          "--seed", "3", "--json", "--quiet")
    assert code == 0
    summary = json.loads(stdout)
    assert set(summary["test"]) >= {"recall@20", "ndcg@20", "recall@50", "ndcg@50"}
    for name in ("embeddings.safetensors", "pretrain_log.json", "pretrain_config.json",
                 "run.json"):
        assert (out / name).exists(), name
    meta = json.loads((out / "run.json").read_text())
    assert meta["seed"] == 3 and meta["peel_version"]


def test_pretrain_config_file_unknown_key(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[pretrain]\nlayerz = 2\n")
    code, _, err = run(capsys, "pretrain", "demo", "--out", str(tmp_path / "r"),
                       "--config", str(cfg))
    assert code == 2 and "layerz" in err and "c.toml" in err


@pytest.mark.parametrize("argv", [["--version"], ["--help"]])
def test_console_entry_point(argv):
    proc = subprocess.run([sys.executable, "-m", "peel.cli", *argv], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0 and "peel" in proc.stdout


def test_set_types_tuple_elements_like_the_default():
    from peel.overrides import apply_overrides as apply_sets
    from peel.pipeline import RunConfig

    cfg = apply_sets(RunConfig(), ["finetune.early_stop_budgets=0.107,0.5",
                                   "deploy.baselines=pmf"])
    assert cfg.finetune.early_stop_budgets == (0.107, 0.5)
    assert cfg.deploy.baselines == ("pmf",)
    cfg.validate()
