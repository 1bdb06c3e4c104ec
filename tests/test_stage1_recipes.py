"""benchmarks/stage1_recipes.py: a recipe's row from a finished run, and joining parallel parts."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from peel.pretrain import PretrainConfig

SPEC = importlib.util.spec_from_file_location(
    "stage1_recipes", Path(__file__).parents[1] / "benchmarks" / "stage1_recipes.py")
recipes = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(recipes)


def _run(tmp: Path, cfg: PretrainConfig, recalls: list[float]) -> Path:
    (tmp / "pretrain").mkdir(parents=True)
    saved = asdict(cfg)
    del saved["nested_dims"]  # a run made before a field existed: read at its default
    (tmp / "pretrain" / "pretrain_config.json").write_text(json.dumps(saved))
    history = [{"epoch": e + 1, "loss": 0.1, "elapsed": 10.0 * (e + 1),
                "valid": {"recall@20": r, "ndcg@20": r / 2}} for e, r in enumerate(recalls)]
    (tmp / "pretrain" / "pretrain_log.json").write_text(json.dumps({"history": history}))
    return tmp


def test_a_reused_run_is_cut_at_the_epoch_cap(tmp_path: Path) -> None:
    base = PretrainConfig(seed=3, epochs=3)
    run = _run(tmp_path, replace(base, epochs=300, device="cpu"), [0.1, 0.3, 0.2, 0.5])
    row = recipes.reused_recipe(run, base, "default")
    # epoch 4's 0.5 lies past the cap of 3: the capped training never saw it
    assert (row["best_epoch"], row["best_recall@20"], row["epochs"]) == (2, 0.3, 3)
    assert row["seconds_to_best"] == 20.0 and row["reused_from"] == str(run)


def test_a_run_with_another_recipe_is_refused(tmp_path: Path) -> None:
    run = _run(tmp_path, PretrainConfig(seed=3, sampling="uniform"), [0.1])
    with pytest.raises(SystemExit, match="sampling"):
        recipes.reused_recipe(run, PretrainConfig(seed=3), "default")


def test_merge_joins_parts_in_recipe_order_and_decides(tmp_path: Path) -> None:
    def part(name: str, recall: float) -> Path:
        row = {"recipe": name, "overrides": recipes.RECIPES[name], "best_epoch": 1,
               "best_recall@20": recall, "best_ndcg@20": recall / 2, "seconds_to_best": 5.0}
        doc = {"dataset": "d", "seed": 0, "dim": 8, "machine": "m", "minutes_cap": None,
               "epochs_cap": 4,
               "recipes": [row], "decision": name}
        recipes.write(tmp_path / name / "stage1_recipes_valid_seed0", doc)
        return tmp_path / name

    parts = [part("default", 0.20), part("paper", 0.10), part("dns8", 0.25)]
    recipes.merge(parts, tmp_path / "all", 0)
    doc = json.loads((tmp_path / "all" / "stage1_recipes_valid_seed0.json").read_text())
    assert [r["recipe"] for r in doc["recipes"]] == ["paper", "dns8", "default"]
    assert doc["decision"] == "dns8"
    other = part("uniform-fast", 0.3)
    data = json.loads((other / "stage1_recipes_valid_seed0.json").read_text())
    data["epochs_cap"] = 9
    (other / "stage1_recipes_valid_seed0.json").write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="differ"):
        recipes.merge([*parts, other], tmp_path / "bad", 0)
