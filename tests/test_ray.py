"""The Ray executor: same bits as the local executor, resumable, failures named, data sent once.

Runs only where Ray is installed (``pip install 'peel-rec[ray]'``; the ``dev`` extra has it).
One local Ray with 2 CPUs serves the whole module; peel joins it instead of starting its own.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip(
    "ray", reason="Ray is not installed; pip install 'peel-rec[ray]' to run the Ray tests")

from peel.cli import main  # noqa: E402
from peel.errors import TaskError  # noqa: E402
from peel.executor import RayExecutor, SerialExecutor  # noqa: E402
from peel.synthetic import SyntheticConfig, make_demo, write_lightgcn_folder  # noqa: E402

CONFIG = """
[run]
workers = 1

[pretrain]
dim = 16
block_dim = 4
layers = 1
epochs = 2
batch_size = 2048
patience = 2

[groups]
n_user_groups = 3
n_item_groups = 4

[finetune]
n_blocks = 4
block_dim = 4
max_epochs = 2
patience = 1
eval_users = 60

[deploy]
budgets = ["0.4", "0.8"]
baselines = ["pmf", "lightgcn-svd"]
"""

#: Fields of a group's JSON that are wall-clock measurements, not results.
TIMINGS = ("seconds", "train_seconds")


@pytest.fixture(scope="module")
def local_ray():
    # workers import this module's task functions as spawned processes do
    tests = str(Path(__file__).parent)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning",
             runtime_env={"env_vars": {"PYTHONPATH": tests}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, local_ray) -> Path:
    """The same small run trained with the local executor and with Ray (stage 1 shared)."""
    root = tmp_path_factory.mktemp("ray")
    data = make_demo(SyntheticConfig(n_users=180, n_items=120, n_communities=3, n_topics=6,
                                     mean_interactions=16, seed=7))
    write_lightgcn_folder(data, str(root / "data"))
    (root / "cfg.toml").write_text(CONFIG)
    common = [str(root / "data"), "--config", str(root / "cfg.toml"), "--seed", "3", "--quiet"]
    assert main(["train", *common, "--out", str(root / "local")]) == 0
    assert main(["train", *common, "--out", str(root / "ray"), "--executor", "ray",
                 "--workers", "2", "--reuse-pretrain", str(root / "local")]) == 0
    return root


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _without_timings(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k not in TIMINGS}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def _group_files(run: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted((run / "groups").glob("group_*"))}


def test_group_files_are_bitwise_those_of_the_local_executor(runs: Path) -> None:
    local, distributed = _group_files(runs / "local"), _group_files(runs / "ray")
    assert sorted(local) == sorted(distributed)
    assert len([n for n in local if n.endswith(".npz")]) == 3
    for name, path in local.items():
        if name.endswith(".npz"):
            assert _digest(path) == _digest(distributed[name]), name
        else:  # JSON: identical apart from wall-clock seconds
            a = _without_timings(json.loads(path.read_text()))
            b = _without_timings(json.loads(distributed[name].read_text()))
            assert a == b, name


def test_evaluate_with_ray_gives_the_local_rows(runs: Path, capsys) -> None:
    rows = {}
    for name, extra in (("local", []), ("ray", ["--executor", "ray", "--workers", "2"])):
        capsys.readouterr()
        assert main(["evaluate", str(runs / name), "--baselines", "--json", "--quiet",
                     *extra]) == 0
        rows[name] = [_without_timings(r) for r in json.loads(capsys.readouterr().out)]
    assert [(r["method"], r["budget"]) for r in rows["ray"]] == [
        ("PEEL", "0.8"), ("PEEL", "0.4"), ("PMF", "0.4"), ("PMF", "0.8"),
        ("lightgcn-svd", "0.4"), ("lightgcn-svd", "0.8")]
    assert rows["ray"] == rows["local"]  # metrics, bytes and chosen sizes, bit for bit


def test_a_resumed_ray_run_retrains_only_what_is_missing(runs: Path) -> None:
    run = runs / "ray"
    before = {n: _digest(p) for n, p in _group_files(run).items() if n.endswith(".npz")}
    for suffix in (".npz", ".json"):
        (run / "groups" / f"group_001{suffix}").unlink()  # as if the driver died mid-group
    assert main(["train", "--out", str(run), "--config", str(runs / "cfg.toml"),
                 str(runs / "data"), "--seed", "3", "--quiet", "--executor", "ray"]) == 0
    summary = json.loads((run / "train_summary.json").read_text())
    assert {g["group"]: g["skipped"] for g in summary["groups"]} == {0: True, 1: False,
                                                                    2: True}
    after = {n: _digest(p) for n, p in _group_files(run).items() if n.endswith(".npz")}
    assert after == before


def square_or_fail(x: int) -> int:
    """Module-level so Ray workers can import it."""
    if x < 0:
        raise ValueError(f"negative task {x}")
    return x * x


def first_row_sum(task: int, shared: np.ndarray) -> float:
    return float(shared[task].sum())


def test_ray_keeps_order_and_names_the_failed_task_and_its_cause(local_ray) -> None:
    with RayExecutor(workers=2, progress=False) as ex:
        assert ex.map(square_or_fail, [3, 1, 2, 5]) == [9, 1, 4, 25]
        assert ex.map(square_or_fail, []) == []
        with pytest.raises(TaskError, match=r"g001 failed on a Ray worker .*ValueError: "
                                            r"negative task -3") as err:
            ex.map(square_or_fail, [1, -3, 4], labels=["g000", "g001", "g002"])
        assert err.value.label == "g001" and isinstance(err.value.cause, ValueError)
        assert ex.map(square_or_fail, [4]) == [16]  # the executor survives a failed task
    assert ray.is_initialized()  # a Ray it did not start is left running


def test_shared_data_goes_into_the_object_store_once(local_ray, monkeypatch) -> None:
    puts = []
    real_put = ray.put

    def counting_put(value: Any, **kw: Any) -> Any:
        puts.append(type(value).__name__)
        return real_put(value, **kw)

    monkeypatch.setattr(ray, "put", counting_put)
    table = np.arange(40_000, dtype=np.float64).reshape(200, 200)
    ex = RayExecutor(workers=2, progress=False)
    tasks = list(range(0, 200, 10))
    got = ex.map(first_row_sum, tasks, shared=table)
    assert got == SerialExecutor(progress=False).map(first_row_sum, tasks, shared=table)
    assert puts == ["ndarray"]  # one put for 20 tasks


def test_joining_no_cluster_is_one_line(monkeypatch) -> None:
    """``--ray-address`` where no Ray runs: a message naming the address and the fix."""
    from peel.errors import ConfigError

    def refuse(*args: Any, **kw: Any) -> None:
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ConfigError, match=r"--ray-address auto: no Ray cluster to join there"
                                          r".*ray start --head"):
        RayExecutor("auto", progress=False).connect()
