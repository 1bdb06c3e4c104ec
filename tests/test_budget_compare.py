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


def test_full_budget_gives_a_fixed_size_baseline_every_dimension() -> None:
    from peel.baselines.base import fixed_size_dim
    from peel.budget import full_table_bytes, parse_budget

    n_items, dim = 40_981, 128
    full = full_table_bytes(n_items, dim)
    assert fixed_size_dim(parse_budget("1.0", full), n_items) == dim - 1  # the table alone
    assert fixed_size_dim(bc.baseline_budget(bc.ALL, full, n_items, dim), n_items) == dim
    assert bc.baseline_budget("0.107", full, n_items, dim) == parse_budget("0.107", full)


def test_lightgcn_at_full_size_is_the_pretrained_row_marked_as_such(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    ours, full, small = rng.random(50), rng.random(50), rng.random(50)
    row = {"recall@20": float(ours.mean()), "ndcg@20": 0.1}
    doc = {"seed": 3, "methods": {
        "PEEL": {"0.2": row, "1.0": row},
        "pretrained": {"1.0": {"recall@20": float(full.mean()), "ndcg@20": 0.2}},
        "LightGCN": {"0.2": {"recall@20": float(small.mean()), "ndcg@20": 0.3}}}}
    (tmp_path / "seed3.json").write_text(json.dumps(doc))
    np.savez(tmp_path / "per_user_seed3.npz", users=np.arange(50),
             **{"PEEL|0.2|recall@20": ours, "PEEL|1.0|recall@20": ours,
                "pretrained|1.0|recall@20": full, "LightGCN|0.2|recall@20": small})
    bc.summarise(tmp_path, "PEEL")
    seeds = json.loads((tmp_path / "seeds.json").read_text())
    paired = json.loads((tmp_path / "paired.json").read_text())
    assert seeds["LightGCN"]["1.0"]["recall@20"] == [float(full.mean())]
    assert seeds["LightGCN"]["1.0"]["same_model_as"] == "pretrained"
    assert paired["3"]["LightGCN"]["1.0"] == paired["3"]["pretrained"]["1.0"]
    assert "LightGCN at 1.0 is the pretrained model's row." in (
        tmp_path / "summary.md").read_text()
