"""benchmarks/multidim_compare.py keeps an earlier file's rows beside new ones, or refuses."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "multidim_compare", Path(__file__).parents[1] / "benchmarks" / "multidim_compare.py")
mc = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(mc)


def _doc(methods: dict) -> dict:
    return {"run": "r", "seed": 0, "split": "test", "methods": methods, "seconds": {"total": 2.0}}


def test_kept_rows_are_relabelled_and_new_rows_win() -> None:
    doc = _doc({"AutoEmb": {"0.1": {"recall@20": 0.3}}})
    old = _doc({"AutoEmb": {"0.1": {"recall@20": 0.1}}, "ESAPN": {"0.1": {"recall@20": 0.2}}})
    mc.keep_rows(doc, old, Path("old.json"), ["AutoEmb=AutoEmb (argmax)"])
    assert doc["methods"]["AutoEmb"]["0.1"] == {"recall@20": 0.3}
    assert doc["methods"]["AutoEmb (argmax)"]["0.1"]["recall@20"] == 0.1
    assert doc["methods"]["ESAPN"]["0.1"]["kept_from"] == "old.json"
    assert doc["seconds"]["kept: total"] == 2.0


def test_a_file_of_another_seed_is_refused() -> None:
    old = {**_doc({}), "seed": 1}
    with pytest.raises(SystemExit, match="seed"):
        mc.keep_rows(_doc({}), old, Path("old.json"), [])
