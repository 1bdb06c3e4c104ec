"""Executors: task order, capped worker threads, identical outputs for any worker count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from peel.elastic import GROUP_ARRAYS, FinetuneConfig, finetune_groups, load_group
from peel.executor import ProcessExecutor, SerialExecutor, make_executor, torch_threads
from peel.groups import GroupConfig, make_item_groups
from peel.synthetic import SyntheticConfig, make_demo


def square_and_threads(x: int) -> tuple[int, int]:
    """Module-level so spawned workers can import it."""
    if x < 0:
        raise ValueError(f"negative task {x}")
    return x * x, torch.get_num_threads()


def test_serial_executor_keeps_order_and_restores_threads() -> None:
    before = torch.get_num_threads()
    out = SerialExecutor(threads=1, progress=False).map(square_and_threads, [3, 1, 2])
    assert [r[0] for r in out] == [9, 1, 4]
    assert all(r[1] == 1 for r in out)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="2 labels for 3 tasks"):
        SerialExecutor(progress=False).map(square_and_threads, [1, 2, 3], labels=["a", "b"])
    with pytest.raises(ValueError, match="negative task"):
        SerialExecutor(progress=False).map(square_and_threads, [1, -1])


def test_process_executor_keeps_order_caps_threads_and_reraises() -> None:
    with ProcessExecutor(workers=2, threads_per_worker=1, progress=False) as ex:
        out = ex.map(square_and_threads, [5, 0, 7, 2], labels=["a", "b", "c", "d"])
        assert [r[0] for r in out] == [25, 0, 49, 4]
        assert {r[1] for r in out} == {1}
        assert ex.map(square_and_threads, []) == []
        with pytest.raises(ValueError, match="negative task"):
            ex.map(square_and_threads, [1, -3, 4])
        # the pool survives a task's exception and is reused
        assert [r[0] for r in ex.map(square_and_threads, [3])] == [9]


def nap(x: float) -> float:
    import time

    time.sleep(x)
    return x


def test_progress_shows_only_tasks_a_worker_is_running(monkeypatch) -> None:
    """The pool pre-queues work; the display must not call queued tasks running."""
    import peel.executor as executor

    peaks = []

    class Recording(executor._Progress):
        def set(self, i: int, status: str, seconds: float | None = None) -> None:
            super().set(i, status, seconds)
            peaks.append(sum(s == "running" for s in self.status))

    monkeypatch.setattr(executor, "_Progress", Recording)
    with ProcessExecutor(workers=2, threads_per_worker=1, progress=False) as ex:
        assert ex.map(nap, [0.2] * 6) == [0.2] * 6
    assert max(peaks) == 2


def test_default_threads_do_not_oversubscribe() -> None:
    ex = ProcessExecutor(workers=64, progress=False)
    assert ex.threads == 1
    assert isinstance(make_executor(1, progress=False), SerialExecutor)
    with torch_threads(1):
        assert torch.get_num_threads() == 1


def test_one_and_two_workers_give_identical_group_outputs(tmp_path: Path) -> None:
    from scipy.sparse.linalg import svds

    data = make_demo(SyntheticConfig(n_users=240, n_items=150, seed=3))
    u, s, vt = svds(data.train.astype(np.float64), k=16, random_state=0)
    user_emb = (u * np.sqrt(s)).astype(np.float32)
    item_emb = (vt.T * np.sqrt(s)).astype(np.float32)
    item_groups = make_item_groups(data.item_popularity, GroupConfig(n_item_groups=5), 0)
    user_groups = np.arange(data.n_users) % 3
    cfg = FinetuneConfig(n_blocks=4, block_dim=4, scorer="mlp", mlp_hidden=16,
                         controller_hidden=16, batch_size=128, max_epochs=2,
                         init="pretrained", transform="eq4", importance="controller",
                         train_budgets=())
    args = (data, user_emb, item_emb, user_groups, item_groups, cfg)
    one = finetune_groups(*args, tmp_path / "one", SerialExecutor(threads=2, progress=False),
                          seed=5)
    two = finetune_groups(*args, tmp_path / "two", ProcessExecutor(2, progress=False), seed=5)
    assert [s.group for s in one] == [s.group for s in two] == [0, 1, 2]
    for g in range(3):
        a = load_group(tmp_path / "one" / "groups" / f"group_{g:03d}.npz")
        b = load_group(tmp_path / "two" / "groups" / f"group_{g:03d}.npz")
        for key in GROUP_ARRAYS:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"group {g} {key}")
    # groups are seeded by (seed, group id): different groups do not share a trajectory
    assert one[0].history[1]["loss"] != one[1].history[1]["loss"]


class ReadOnlyShared(SerialExecutor):
    """Gives tasks read-only arrays, as Ray's object store does, and records what was sent."""

    def __init__(self) -> None:
        super().__init__(threads=1, progress=False)
        self.sent: list = []
        self.shared = None

    def map(self, fn, tasks, labels=None, shared=None):
        self.sent, self.shared = list(tasks), shared
        for arr in _arrays(shared) + [a for t in tasks for a in _arrays(t)]:
            arr.setflags(write=False)
        return super().map(fn, tasks, labels, shared)


def _arrays(obj) -> list[np.ndarray]:
    """Every numpy array of a dataclass task (sparse matrices included)."""
    import dataclasses

    import scipy.sparse as sp

    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, np.ndarray):
            out.append(value)
        elif isinstance(value, sp.csr_matrix):
            out += [value.data, value.indices, value.indptr]
        elif dataclasses.is_dataclass(value):
            out += _arrays(value)
    return out


def test_group_tasks_travel_without_the_shared_tables_and_take_read_only_inputs(
        tmp_path: Path) -> None:
    """The item table goes once as ``shared``; a worker that receives read-only views (Ray's
    object store) trains the same bits as the plain serial executor."""
    data = make_demo(SyntheticConfig(n_users=120, n_items=90, seed=2))
    rng = np.random.default_rng(0)
    user_emb = rng.normal(size=(data.n_users, 8)).astype(np.float32)
    item_emb = rng.normal(size=(data.n_items, 8)).astype(np.float32)
    item_groups = make_item_groups(data.item_popularity, GroupConfig(n_item_groups=3), 0)
    user_groups = np.arange(data.n_users) % 2
    cfg = FinetuneConfig(n_blocks=2, block_dim=4, max_epochs=1, eval_users=30)
    args = (data, user_emb, item_emb, user_groups, item_groups, cfg)
    recorder = ReadOnlyShared()
    finetune_groups(*args, tmp_path / "ro", recorder, seed=1)
    finetune_groups(*args, tmp_path / "plain", SerialExecutor(progress=False), seed=1)
    assert len(recorder.sent) == 2
    assert all(t.item_emb.size == 0 and t.item_group.size == 0 for t in recorder.sent)
    np.testing.assert_array_equal(recorder.shared.item_emb, item_emb)
    for g in range(2):
        a = (tmp_path / "ro" / "groups" / f"group_{g:03d}.npz").read_bytes()
        b = (tmp_path / "plain" / "groups" / f"group_{g:03d}.npz").read_bytes()
        assert a == b, f"group {g}"


def test_baselines_as_tasks_give_the_rows_of_the_serial_loop() -> None:
    from dataclasses import asdict, replace

    from peel.pipeline import RunConfig, evaluate_baselines
    from peel.pretrain import PretrainConfig

    data = make_demo(SyntheticConfig(n_users=120, n_items=90, seed=2))
    cfg = replace(RunConfig(), pretrain=PretrainConfig(dim=8, block_dim=4, layers=1, epochs=1,
                                                       batch_size=1024))
    budgets = ["0.25", "0.75"]
    methods = ["pmf", "lightgcn-svd"]
    loop = evaluate_baselines(data, cfg, budgets, progress=False, methods=methods)
    recorder = ReadOnlyShared()
    tasks = evaluate_baselines(data, cfg, budgets, progress=False, methods=methods,
                               executor=recorder)
    assert [t.method for t in recorder.sent] == ["pmf", "pmf", "lightgcn-svd", "lightgcn-svd"]

    def strip(row):
        d = asdict(row)
        d["detail"] = {k: v for k, v in d["detail"].items() if "seconds" not in k}
        return d

    assert [strip(r) for r in tasks] == [strip(r) for r in loop]


def test_ray_executor_without_ray_is_one_line_naming_the_extra(monkeypatch, tmp_path,
                                                               capsys) -> None:
    import sys

    from peel.cli import main
    from peel.errors import ConfigError

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'peel-rec\[ray\]'"):
        make_executor(2, backend="ray")
    capsys.readouterr()
    assert main(["train", "demo", "--out", str(tmp_path / "r"), "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'peel-rec[ray]'" in err
    assert not (tmp_path / "r").exists()  # refused before any work
    assert main(["train", "demo", "--out", str(tmp_path / "r"), "--ray-address", "auto"]) == 2
    assert "--executor ray" in capsys.readouterr().err
