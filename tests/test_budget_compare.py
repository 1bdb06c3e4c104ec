"""benchmarks/budget_compare.py --summarise: means over seeds and paired tests over users."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

SPEC = importlib.util.spec_from_file_location(
    "budget_compare", Path(__file__).parents[1] / "benchmarks" / "budget_compare.py")
bc = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bc)


def _seed(folder: Path, seed: int, ours: np.ndarray, theirs: np.ndarray | None,
          theirs_mean: float) -> None:
    row = {"recall@20": float(ours.mean()), "ndcg@20": float(ours.mean())}
    other = {"recall@20": theirs_mean, "ndcg@20": theirs_mean}
    doc = {"seed": seed, "methods": {"PEEL (auto precision)": {"0.2": row},
                                     "LightGCN": {"0.2": other}}}
    (folder / f"seed{seed}.json").write_text(json.dumps(doc))
    arrays = {"users": np.arange(len(ours)), "PEEL (auto precision)|0.2|recall@20": ours}
    if theirs is not None:
        arrays["LightGCN|0.2|recall@20"] = theirs
    np.savez(folder / f"per_user_seed{seed}.npz", **arrays)


def test_means_over_seeds_and_paired_tests_only_where_users_were_kept(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ours = rng.random(200)
    theirs = ours - 0.1 + 0.01 * rng.random(200)  # PEEL better for every user
    _seed(tmp_path, 1, ours, theirs, float(theirs.mean()))
    _seed(tmp_path, 2, ours, None, 0.25)  # a row from a run without per-user results
    bc.summarise(tmp_path, "PEEL (auto precision)")
    seeds = json.loads((tmp_path / "seeds.json").read_text())
    assert set(seeds) == {"PEEL", "LightGCN"}  # --against is shown as PEEL
    assert np.isclose(np.mean(seeds["LightGCN"]["0.2"]["recall@20"]),
                      (theirs.mean() + 0.25) / 2)
    paired = json.loads((tmp_path / "paired.json").read_text())
    assert set(paired) == {"1"}  # seed 2 has no per-user LightGCN: no test
    test = paired["1"]["LightGCN"]["0.2"]
    assert np.isclose(test["mean_diff_recall@20"], (ours - theirs).mean())
    assert test["users"] == 200 and test["wilcoxon_p"] < 1e-10
    assert "| LightGCN | 0.2 | +0.09" in (tmp_path / "summary.md").read_text()


def test_a_method_may_name_its_own_budgets() -> None:
    assert bc.method_budgets("lightgcn", ["0.1", "0.2"]) == ("lightgcn", ["0.1", "0.2"])
    assert bc.method_budgets("lightgcn-fp16@0.107+0.213", ["0.5"]) == (
        "lightgcn-fp16", ["0.107", "0.213"])
