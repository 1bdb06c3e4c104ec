"""Where independent jobs (user groups, baselines x budgets) run: in-process, in worker
processes, or as Ray tasks on a local or remote Ray cluster.

Training code only calls ``executor.map(fn, tasks, labels=..., shared=...)`` and gets results
back in task order, so a backend is one class with that method and the training code does not
change. ``fn`` must be a module-level function and tasks plain data, because worker processes
are started with the *spawn* method (no state inherited by fork, identical behaviour on every
OS) and Ray ships tasks to other machines. What every task reads (the dataset, the pretrained
tables) is passed once as ``shared`` and ``fn(task, shared)`` is called: Ray puts it in its
object store once per call, so it travels once per node instead of once per task.

Results do not depend on the executor: each task seeds itself from its own data (seed, group
id), and workers run a fixed number of torch threads so that parallel workers never
oversubscribe the cores.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import ctypes
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Protocol, TypeVar

import torch

from peel.errors import ConfigError, TaskError

T = TypeVar("T")
R = TypeVar("R")


#: Backends ``make_executor`` (and ``--executor``) accepts.
EXECUTORS = ("local", "ray")
#: The one line a user without Ray reads.
RAY_HINT = "pip install 'peel-rec[ray]'"


class Executor(Protocol):
    """Runs ``fn`` over ``tasks`` and returns the results in task order.

    With ``shared`` (not None) each call is ``fn(task, shared)``: data common to every task,
    which a distributed backend sends once instead of once per task.
    """

    def map(self, fn: Callable[..., R], tasks: Sequence[T],
            labels: Sequence[str] | None = None, shared: Any = None) -> list[R]: ...


def _apply(fn: Callable[..., R], task: Any, shared: Any) -> R:
    return fn(task) if shared is None else fn(task, shared)


def available_cores() -> int:
    """Cores this process may use (respects CPU affinity / container limits where visible)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily run torch with ``n`` intra-op threads (None: leave unchanged)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def deterministic_torch() -> Iterator[None]:
    """Same seed, same bits, at any thread count.

    With more than one intra-op thread, torch's CPU backward of ``x[idx]`` (index_put with
    accumulate) adds into shared rows with racing atomic adds, so two runs of one command
    differed in the last bits and the difference grew over epochs. Deterministic mode makes
    those kernels accumulate in a fixed order. ``warn_only`` keeps accelerators without a
    deterministic kernel for some op running (with a warning) instead of failing.
    """
    before = torch.are_deterministic_algorithms_enabled()
    warn_before = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_before)


def _labels(tasks: Sequence[Any], labels: Sequence[str] | None) -> list[str]:
    if labels is None:
        return [f"task{i}" for i in range(len(tasks))]
    if len(labels) != len(tasks):
        raise ValueError(f"{len(labels)} labels for {len(tasks)} tasks")
    return list(labels)


class _Progress:
    """One tqdm line: done/total plus which tasks are running and the last finished one."""

    def __init__(self, desc: str, labels: list[str], enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.labels = labels
        self.status = ["queued"] * len(labels)
        unit = "group" if desc == "groups" else "task"
        self.bar = tqdm(total=len(labels), desc=desc, unit=unit, disable=not enabled,
                        dynamic_ncols=True)
        self.last = ""

    def set(self, i: int, status: str, seconds: float | None = None) -> None:
        previous, self.status[i] = self.status[i], status
        if status == "done" and previous != "done":
            self.bar.update(1)
            self.last = f"{self.labels[i]} {seconds:.1f}s" if seconds is not None else ""
        running = [lab for lab, s in zip(self.labels, self.status, strict=True) if s == "running"]
        queued = sum(s == "queued" for s in self.status)
        post = f"running {','.join(running) or '-'} | queued {queued}"
        if self.last:
            post += f" | last {self.last}"
        self.bar.set_postfix_str(post, refresh=True)

    def close(self) -> None:
        self.bar.close()


class SerialExecutor:
    """Runs tasks one after another in this process (debugging, tests, 1 worker)."""

    def __init__(self, threads: int | None = None, progress: bool = True,
                 desc: str = "groups") -> None:
        self.threads = threads
        self.progress = progress
        self.desc = desc

    def __enter__(self) -> SerialExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn: Callable[..., R], tasks: Sequence[T],
            labels: Sequence[str] | None = None, shared: Any = None) -> list[R]:
        bar = _Progress(self.desc, _labels(tasks, labels), self.progress)
        out: list[R] = []
        try:
            with torch_threads(self.threads):
                for i, task in enumerate(tasks):
                    bar.set(i, "running")
                    t0 = time.perf_counter()
                    out.append(_apply(fn, task, shared))
                    bar.set(i, "done", time.perf_counter() - t0)
        finally:
            bar.close()
        return out


#: linux/prctl.h: deliver a signal to this process when its parent dies.
_PR_SET_PDEATHSIG = 1
#: Seconds between the fallback watchdog's checks that the parent is still alive.
PARENT_POLL_S = 0.5


def die_with_parent(parent: int, poll_s: float = PARENT_POLL_S) -> None:
    """End this worker when ``parent`` dies, however it dies.

    ``kill -9`` of ``peel train`` used to leave its workers (~350 MB each) running, and they
    kept writing group files into the folder the re-run was using. On Linux the kernel sends
    SIGKILL to the worker when the parent dies (``PR_SET_PDEATHSIG``); everywhere a daemon
    thread also polls the parent pid and exits when the worker has been re-parented.
    """
    _set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the kernel could be told
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent, poll_s), daemon=True,
                     name="peel-parent-watchdog").start()


def _set_pdeathsig(sig: int) -> bool:
    """Ask the Linux kernel to send ``sig`` on the parent's death; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, poll_s: float) -> None:
    while True:
        time.sleep(poll_s)
        if os.getppid() != parent:
            os._exit(1)


def _init_worker(threads: int, parent: int | None = None) -> None:
    """Tie the worker's life to its parent's, and cap its threads so workers x threads <= cores."""
    if parent is not None:
        die_with_parent(parent)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set in this process
        torch.set_num_interop_threads(1)


class ProcessExecutor:
    """Runs tasks in ``workers`` spawned processes (default: one per available core).

    Each :meth:`map` starts and stops its own pool, unless the executor is used as a context
    manager (``with ProcessExecutor(2) as ex: ...``), which keeps one pool for every call and
    saves the workers' start-up (importing torch) between stages.
    """

    def __init__(self, workers: int | None = None, threads_per_worker: int | None = None,
                 progress: bool = True, desc: str = "groups") -> None:
        cores = available_cores()
        self.workers = max(1, workers if workers is not None else cores)
        self.threads = (threads_per_worker if threads_per_worker is not None
                        else max(1, cores // self.workers))
        self.progress = progress
        self.desc = desc
        self._pool: cf.ProcessPoolExecutor | None = None

    def _new_pool(self, workers: int) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_init_worker,
                                      initargs=(self.threads, os.getpid()))

    def __enter__(self) -> ProcessExecutor:
        if self._pool is None:
            self._pool = self._new_pool(self.workers)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def map(self, fn: Callable[..., R], tasks: Sequence[T],
            labels: Sequence[str] | None = None, shared: Any = None) -> list[R]:
        names = _labels(tasks, labels)
        if not tasks:
            return []
        if self._pool is not None:
            return self._run(self._pool, fn, tasks, names, shared)
        with self._new_pool(min(self.workers, len(tasks))) as pool:
            return self._run(pool, fn, tasks, names, shared)

    def _run(self, pool: cf.ProcessPoolExecutor, fn: Callable[..., R], tasks: Sequence[T],
             names: list[str], shared: Any) -> list[R]:
        bar = _Progress(self.desc, names, self.progress)
        results: dict[int, R] = {}
        # At most one task in flight per worker: the pool would otherwise pre-queue several and
        # report them all as running, so the display and per-task seconds would be wrong.
        todo = collections.deque(range(len(tasks)))
        running: dict[cf.Future[R], tuple[int, float]] = {}  # future -> (task, start time)
        try:
            while todo or running:
                while todo and len(running) < self.workers:
                    i = todo.popleft()
                    # shared is pickled with each task here: a pool has no object store
                    running[pool.submit(_apply, fn, tasks[i], shared)] = (i, time.perf_counter())
                    bar.set(i, "running")
                finished, _ = cf.wait(running, timeout=1.0, return_when=cf.FIRST_COMPLETED)
                now = time.perf_counter()
                for fut in finished:
                    i, t0 = running.pop(fut)
                    results[i] = fut.result()  # re-raises a worker's exception here
                    bar.set(i, "done", now - t0)
        except BaseException:
            for fut in running:  # do not leave queued work running behind an error
                fut.cancel()
            raise
        finally:
            bar.close()
        return [results[i] for i in range(len(tasks))]


def require_ray() -> ModuleType:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError as err:
        raise ConfigError(f"--executor ray needs Ray, which is not installed: {RAY_HINT}") \
            from err
    return ray


def _ray_call(fn: Callable[..., R], task: Any, shared: Any, threads: int) -> R:
    """What a Ray worker runs: ``fn`` with the task's CPU share as torch threads.

    Ray resolves the ``shared`` object reference before the call (zero-copy for numpy arrays
    on the worker's node); a worker process is reused across tasks, so torch threads are set
    for every task rather than once.
    """
    with torch_threads(threads):
        return _apply(fn, task, shared)


class RayExecutor:
    """Runs tasks as Ray tasks: on a local Ray started here, or on a running cluster.

    ``address`` None starts a local Ray with ``workers * threads_per_worker`` CPUs (all
    available cores by default) and stops it on :meth:`close`; ``"auto"`` or ``HOST:PORT``
    joins a running cluster (``ray start --head`` / a Ray cluster launcher) and leaves it
    running. A Ray already initialised in this process is used as it is. Each task asks Ray
    for ``threads_per_worker`` CPUs and runs torch with that many threads; at most ``workers``
    tasks (default: the cluster's CPUs / threads) are in flight, so the progress line shows
    only tasks that run and per-task seconds are real. Results come back in task order and
    are bitwise those of the local executors: tasks seed themselves from their own data.

    Ray moves task arguments and results between the processes it started with its own
    serialisation; nothing it serialises is ever written to a run folder. On a multi-node
    cluster every node needs peel installed and the run folder on a filesystem all nodes see.
    """

    def __init__(self, address: str | None = None, workers: int | None = None,
                 threads_per_worker: int = 1, progress: bool = True, desc: str = "groups",
                 max_retries: int = 1) -> None:
        self.ray = require_ray()
        if workers is not None and workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        if threads_per_worker < 1:
            raise ConfigError(f"threads_per_worker must be >= 1, got {threads_per_worker}")
        self.address = address
        self.workers = workers
        self.threads = threads_per_worker
        self.progress = progress
        self.desc = desc
        #: Re-runs of a task whose worker process or node died (a task's own exception is
        #: never retried); safe because a task's files are written atomically and identical.
        self.max_retries = max_retries
        self._owns = False

    def __enter__(self) -> RayExecutor:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        """Join or start Ray (once; a Ray this process already runs is reused)."""
        ray = self.ray
        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine
        if self.address:
            try:
                ray.init(address=self.address, logging_level="warning")
            except ConnectionError as err:
                raise ConfigError(
                    f"--ray-address {self.address}: no Ray cluster to join there "
                    f"({str(err).splitlines()[0]}); start one (`ray start --head`) or leave "
                    "--ray-address out to start a local Ray") from err
        else:
            # Ray starts workers 15 nice levels below the driver, which starves them on a
            # shared machine; a local Ray started for this run gets the driver's priority,
            # as the local executor's workers do.
            cpus = (self.workers or available_cores()) * self.threads
            ray.init(num_cpus=cpus, include_dashboard=False, logging_level="warning",
                     _system_config={"worker_niceness": 0})
        self._owns = True

    def close(self) -> None:
        """Stop the Ray this executor started (a joined cluster keeps running)."""
        if self._owns:
            self.ray.shutdown()
            self._owns = False

    def slots(self) -> int:
        """Tasks in flight at once: ``workers``, else the cluster's CPUs / threads per task."""
        if self.workers is not None:
            return self.workers
        cpus = float(self.ray.cluster_resources().get("CPU", 1.0))
        return max(1, int(cpus // self.threads))

    def map(self, fn: Callable[..., R], tasks: Sequence[T],
            labels: Sequence[str] | None = None, shared: Any = None) -> list[R]:
        names = _labels(tasks, labels)
        if not tasks:
            return []
        self.connect()
        ray = self.ray
        remote = ray.remote(_ray_call).options(num_cpus=self.threads,
                                               max_retries=self.max_retries)
        shared_ref = ray.put(shared) if shared is not None else None  # once, not per task
        slots = self.slots()
        bar = _Progress(self.desc, names, self.progress)
        results: dict[int, R] = {}
        todo = collections.deque(range(len(tasks)))
        running: dict[Any, tuple[int, float]] = {}  # object ref -> (task, start time)
        try:
            while todo or running:
                while todo and len(running) < slots:
                    i = todo.popleft()
                    ref = remote.remote(fn, tasks[i], shared_ref, self.threads)
                    running[ref] = (i, time.perf_counter())
                    bar.set(i, "running")
                ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                now = time.perf_counter()
                for ref in ready:
                    i, t0 = running.pop(ref)
                    results[i] = self._result(ref, names[i])
                    bar.set(i, "done", now - t0)
        except BaseException:
            for ref in running:  # do not leave work running behind an error or Ctrl-C
                with contextlib.suppress(Exception):
                    ray.cancel(ref)
            raise
        finally:
            bar.close()
        return [results[i] for i in range(len(tasks))]

    def _result(self, ref: Any, label: str) -> Any:
        """The task's result, or a :class:`TaskError` naming the task, the worker and why."""
        from ray.exceptions import RayError, RayTaskError

        try:
            return self.ray.get(ref)
        except RayTaskError as err:
            cause = err.cause if isinstance(err.cause, BaseException) else None
            why = f"{type(cause).__name__}: {cause}" if cause is not None else \
                str(err).splitlines()[0]
            raise TaskError(label, cause, f"{label} failed on a Ray worker ({_worker_of(err)}):"
                                          f" {why}") from cause
        except RayError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise TaskError(label, err, f"{label}: its Ray worker was lost "
                                        f"({type(err).__name__}: {first})") from err


def _worker_of(err: BaseException) -> str:
    """"pid P on node IP" of a Ray task error (Ray's re-raised copy keeps them only in its
    message, whose first line reads ``ray::fn() (pid=P, ip=IP)``)."""
    pid, ip = vars(err).get("pid"), vars(err).get("ip")
    if pid is None or ip is None:
        found = re.search(r"\(pid=(\d+), ip=([^)\s,]+)", str(err))
        if found is None:
            return "worker unknown"
        pid, ip = found.groups()
    return f"pid {pid} on node {ip}"


def make_executor(workers: int | None = None, progress: bool = True, backend: str = "local",
                  address: str | None = None, threads_per_worker: int = 1,
                  desc: str = "groups") -> Executor:
    """``local``: 1 worker in-process (no spawn cost, all cores to torch), more a process pool;
    ``ray``: a :class:`RayExecutor` (``address`` None starts a local Ray)."""
    if backend not in EXECUTORS:
        raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}, got {backend!r}")
    if backend == "ray":
        return RayExecutor(address, workers, threads_per_worker, progress=progress, desc=desc)
    if address is not None:
        raise ConfigError("a Ray address needs the ray executor (--executor ray)")
    if workers == 1:
        return SerialExecutor(threads=available_cores(), progress=progress, desc=desc)
    return ProcessExecutor(workers, progress=progress, desc=desc)
