"""benchmarks/precision_decision.py: the cross-dataset choice of ``precision="auto"``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "precision_decision", Path(__file__).parents[1] / "benchmarks" / "precision_decision.py")
decision = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(decision)


def _write(folder: Path, dataset: str, seed: int, recall: dict[str, list[float]],
           split: str = "valid") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    budgets = ["0.107", "0.213"]
    doc = {"dataset": dataset, "seed": seed, "split": split, "budgets": budgets,
           "rules": list(recall),
           "results": {r: {b: {"recall@20": v} for b, v in zip(budgets, vals, strict=True)}
                       for r, vals in recall.items()}}
    (folder / f"precision_valid_seed{seed}.json").write_text(json.dumps(doc))


def test_datasets_count_equally_and_seeds_are_averaged(tmp_path: Path) -> None:
    # dataset a (two seeds) prefers x by 0.01, dataset b prefers y by 0.03: y wins overall
    _write(tmp_path / "a", "a", 1, {"x": [0.30, 0.30], "y": [0.29, 0.29]})
    _write(tmp_path / "a", "a", 2, {"x": [0.32, 0.32], "y": [0.31, 0.31]})
    _write(tmp_path / "b", "b", 0, {"x": [0.20, 0.20], "y": [0.23, 0.23]})
    result = decision.decide(decision.load([tmp_path / "a", tmp_path / "b"]))
    assert result["score"]["a"] == pytest.approx({"x": 0.31, "y": 0.30})
    assert result["overall"] == pytest.approx({"x": 0.255, "y": 0.265})
    assert result["auto"] == "y"
    assert result["worst_regret"] == pytest.approx({"x": 0.03, "y": 0.01})
    assert "**auto = y**" in decision.markdown(result)


def test_a_tie_goes_to_the_earlier_rule(tmp_path: Path) -> None:
    _write(tmp_path / "a", "a", 0, {"x": [0.3000, 0.3000], "y": [0.3004, 0.3004]})
    assert decision.decide(decision.load([tmp_path / "a"]))["auto"] == "x"
    _write(tmp_path / "b", "b", 0, {"x": [0.3000, 0.3000], "y": [0.3006, 0.3006]})
    assert decision.decide(decision.load([tmp_path / "b"]))["auto"] == "y"


def test_test_split_files_are_refused(tmp_path: Path) -> None:
    _write(tmp_path / "a", "a", 0, {"x": [0.3, 0.3]}, split="test")
    with pytest.raises(SystemExit, match="not a validation file"):
        decision.load([tmp_path / "a"])
