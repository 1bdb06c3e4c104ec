"""benchmarks/compress_compare.py --merge: one seed file from folders scored apart."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))  # compress_compare imports budget_compare as a sibling
SPEC = importlib.util.spec_from_file_location("compress_compare", BENCH / "compress_compare.py")
compress = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(compress)


def _row(recall: float, **extra: float) -> dict:
    return {"recall@20": recall, "ndcg@20": recall / 2, **extra}


def _part(folder: Path, budgets: list[str], users: np.ndarray, rng: np.random.Generator) -> None:
    """A LightRec part at ``budgets``, with the PEEL and pretrained rows every part carries."""
    folder.mkdir()
    light = {b: _row(0.2 + float(b) / 10, codebooks=8, bytes_used=100, seconds=1.0,
                     latency_ms_median=0.5) for b in budgets}
    doc = {"run": "r", "seed": 7, "split": "test", "dataset": "d",
           "methods": {"PEEL": {b: _row(0.3) for b in budgets},
                       "pretrained": {"1.0": _row(0.31)}, "LightRec": light},
           "seconds": {"total": 1.0}, "dense_latency": {"latency_ms_median": 0.1}}
    (folder / "seed7.json").write_text(json.dumps(doc))
    arrays = {"users": users}
    for method in ("PEEL", "LightRec"):
        for b in budgets:
            arrays[f"{method}|{b}|recall@20"] = rng.random(users.size)
    np.savez(folder / "per_user_seed7.npz", **arrays)


def test_merge_joins_one_methods_budgets_from_several_folders(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    users = np.arange(30)
    _part(tmp_path / "small", ["0.107", "0.213"], users, rng)
    _part(tmp_path / "large", ["0.533"], users, rng)
    compress.merge([tmp_path / "small", tmp_path / "large"], tmp_path / "out", None)
    doc = json.loads((tmp_path / "out" / "seed7.json").read_text())
    assert set(doc["methods"]["LightRec"]) == {"0.107", "0.213", "0.533"}  # none replaced
    assert doc["methods"]["LightRec"]["0.107"]["recall@20"] == 0.2 + 0.107 / 10
    with np.load(tmp_path / "out" / "per_user_seed7.npz", allow_pickle=False) as pu:
        assert {f"LightRec|{b}|recall@20" for b in ("0.107", "0.213", "0.533")} <= set(pu.files)
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| LightRec |" in table and "0.533" in table
