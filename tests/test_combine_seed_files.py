"""benchmarks/combine_seed_files.py joins one seed's comparison pieces, or refuses."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SPEC = importlib.util.spec_from_file_location(
    "combine_seed_files", Path(__file__).parents[1] / "benchmarks" / "combine_seed_files.py")
combine_mod = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(combine_mod)


def _part(folder: Path, methods: dict, users: np.ndarray, arrays: dict) -> Path:
    folder.mkdir()
    doc = {"seed": 7, "split": "test", "methods": methods, "seconds": {"x": 1.0}}
    (folder / "seed7.json").write_text(json.dumps(doc))
    np.savez(folder / "per_user_seed7.npz", users=users, **arrays)
    return folder


def test_pieces_of_one_seed_become_one_file(tmp_path: Path) -> None:
    users = np.arange(4)
    peel = {"0.213": {"recall@20": 0.5}}
    a = _part(tmp_path / "a", {"PEEL": peel, "LightGCN": {"0.213": {"recall@20": 0.4}}}, users,
              {"PEEL|0.213|recall@20": np.ones(4), "LightGCN|0.213|recall@20": np.zeros(4)})
    b = _part(tmp_path / "b", {"PEEL": peel, "LightGCN": {"0.533": {"recall@20": 0.6}}}, users,
              {"PEEL|0.213|recall@20": np.ones(4), "LightGCN|0.533|recall@20": np.ones(4)})
    assert combine_mod.combine([a, b], tmp_path / "out") == [7]
    doc = json.loads((tmp_path / "out" / "seed7.json").read_text())
    assert set(doc["methods"]["LightGCN"]) == {"0.213", "0.533"}
    with np.load(tmp_path / "out" / "per_user_seed7.npz") as pu:
        assert {"LightGCN|0.213|recall@20", "LightGCN|0.533|recall@20"} <= set(pu.files)


def test_pieces_from_different_runs_are_refused(tmp_path: Path) -> None:
    users = np.arange(3)
    a = _part(tmp_path / "a", {"PEEL": {"0.2": {"recall@20": 0.5}}}, users, {})
    b = _part(tmp_path / "b", {"PEEL": {"0.2": {"recall@20": 0.7}}}, users, {})
    with pytest.raises(SystemExit, match="differs"):
        combine_mod.combine([a, b], tmp_path / "out")
    c = _part(tmp_path / "c", {"PEEL": {"0.2": {"recall@20": 0.5}}}, np.arange(5), {})
    with pytest.raises(SystemExit, match="other users"):
        combine_mod.combine([a, c], tmp_path / "out2")
