"""Fuzzing every reader with random bytes and with mutated valid files.

The property (issue 15): a reader either succeeds or raises one of the project's own error
types (:class:`peel.errors.PeelError` and its subclasses, which are ``ValueError``\\ s). Any
other exception (``KeyError``, ``struct.error``, ``RecursionError``, ``OverflowError``, ...)
reaches the user as a traceback, so it is a bug. Examples are few and unhurried (no deadline)
so that the whole file runs in well under 30 s on a busy 2-core machine.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peel.data import DataConfig, load_dataset
from peel.device import read_package
from peel.errors import PeelError
from peel.io import read_json
from peel.package import DeployOptions, build_package, synthetic_group
from peel.pipeline import load_config
from peel.report import collect

#: ``PEEL_FUZZ_EXAMPLES=2000`` runs a longer, randomised campaign by hand; CI runs 40, fixed.
_EXAMPLES = int(os.environ.get("PEEL_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=_EXAMPLES, deadline=None, derandomize="PEEL_FUZZ_EXAMPLES" not in
                os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

VALID_LIGHTGCN = b"0 1 2 3\n1 0 2\n2 1 3 4\n3 0 4\n4 2 3\n"
VALID_CSV = (b"user,item,rating,timestamp\n1,10,5,100\n1,11,3,101\n2,10,4,102\n"
             b"2,12,1,103\n3,11,5,104\n3,12,2,105\n")
VALID_TOML = (b'[run]\nlabel = "PEEL"\nworkers = 1\n\n[pretrain]\ndim = 32\nepochs = 3\n'
              b'lr = 0.01\n\n[groups]\nn_user_groups = 3\nnormalize = false\n\n[deploy]\n'
              b'budgets = ["0.4", "0.8"]\n')
VALID_EVAL = json.dumps({
    "peel_version": "0.1.0", "dataset": "demo", "n_items": 100, "full_dim": 32,
    "full_table_bytes": 12800,
    "rows": [{"method": "PEEL", "budget": "0.5", "budget_bytes": 6400, "bytes_used": 6000,
              "metrics": {"recall@20": 0.1, "ndcg@20": 0.05}, "detail": {"users": 10}}],
}).encode()


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """``seed`` with a few random edits: byte flips, insertions, deletions, truncation."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "special"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and data:
            del data[pos: pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[pos:]
        else:
            token = draw(st.sampled_from([b"nan", b"inf", b"-1", b"99999999999999999999",
                                          b"\xf8", b"\x00", b"\xd9\xa3", b",", b"\n", b"[",
                                          b'"', b"{", b"1e400", b"true"]))
            data[pos:pos] = token
    return bytes(data)


def inputs(seed: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=300), mutated(seed))


def check(read: Callable[[], object]) -> None:
    """Success, or a clean project error; anything else fails the test."""
    try:
        read()
    except PeelError as err:
        assert str(err), "an error without a message"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(blob=inputs(VALID_LIGHTGCN), test=inputs(b"0 4\n1 3\n"))
def test_lightgcn_reader(folder: Path, blob: bytes, test: bytes) -> None:
    d = folder / "lightgcn"
    d.mkdir(exist_ok=True)
    (d / "train.txt").write_bytes(blob)
    (d / "test.txt").write_bytes(test)
    check(lambda: load_dataset(d, DataConfig(fmt="lightgcn"), cache_dir=False))


@FUZZ
@given(blob=inputs(VALID_CSV), threshold=st.sampled_from([None, 3.0]),
       split=st.sampled_from(["auto", "random"]))
def test_delimited_reader(folder: Path, blob: bytes, threshold: float | None,
                          split: str) -> None:
    path = folder / "data.csv"
    path.write_bytes(blob)
    cfg = DataConfig(rating_threshold=threshold, split=split)
    check(lambda: load_dataset(path, cfg, cache_dir=False))


@FUZZ
@given(blob=inputs(VALID_CSV.replace(b",", b"\t")))
def test_tab_reader_with_auto_format(folder: Path, blob: bytes) -> None:
    path = folder / "data.tsv"
    path.write_bytes(blob)
    check(lambda: load_dataset(path, cache_dir=False))


@FUZZ
@given(blob=st.binary(max_size=200))
def test_parquet_reader(folder: Path, blob: bytes) -> None:
    path = folder / "data.parquet"
    path.write_bytes(blob)
    check(lambda: load_dataset(path, cache_dir=False))


@pytest.fixture(scope="module", params=["fp32", "fp16", "int8o"])
def package_bytes(tmp_path_factory: pytest.TempPathFactory,
                  request: pytest.FixtureRequest) -> bytes:
    """A format-v3 (float32) and two v4 packages (float16; int8 with scales and offsets)."""
    group = synthetic_group(n_items=40, n_blocks=4, block_dim=2, n_item_groups=3, n_users=2)
    path = tmp_path_factory.mktemp("pkg") / "p.peel"
    build_package(path, group, "64KB", user=0, item_ids=np.arange(100, 140),
                  seen=np.array([1, 2]), options=DeployOptions(precision=request.param))
    return path.read_bytes()


def _open_and_use(blob: bytes, verify: bool) -> None:
    pkg = read_package(blob, "fuzz.peel", verify=verify)
    if pkg.user_emb is not None:
        pkg.rank(k=5)
    pkg.shrink(pkg.budget)


def _resign(blob: bytes) -> bytes:
    """A fresh sha256 after the edits, so the mutations reach the checks past the digest."""
    if len(blob) < 64:
        return blob
    digest = hashlib.sha256(blob[:32])
    digest.update(blob[64:])
    return blob[:32] + digest.digest() + blob[64:]


@FUZZ
@given(data=st.data(), verify=st.booleans(), resign=st.booleans())
def test_package_loader(package_bytes: bytes, data: st.DataObject, verify: bool,
                        resign: bool) -> None:
    blob = data.draw(st.one_of(st.binary(max_size=300), mutated(package_bytes)))
    blob = _resign(blob) if resign else blob
    check(lambda: _open_and_use(blob, verify))


@FUZZ
@given(blob=inputs(VALID_TOML))
def test_config_loader(folder: Path, blob: bytes) -> None:
    path = folder / "cfg.toml"
    path.write_bytes(blob)

    check(lambda: load_config(path))
    try:
        cfg = load_config(path)
    except PeelError:
        return
    try:  # semantic checks of the stages keep their documented ValueError
        cfg.validate()
    except ValueError as err:
        assert str(err)


@FUZZ
@given(blob=inputs(VALID_EVAL))
def test_eval_json_reader_of_report(folder: Path, blob: bytes) -> None:
    run = folder / "run"
    run.mkdir(exist_ok=True)
    (run / "eval.json").write_bytes(blob)
    check(lambda: collect([run]))
    check(lambda: read_json(run / "eval.json"))
