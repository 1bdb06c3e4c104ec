"""Where independent jobs (one per user group) run: in-process or in worker processes.

Training code only calls ``executor.map(fn, tasks, labels=...)`` and gets results back in task
order, so another backend (a cluster scheduler, Ray, ...) can be added by implementing the same
one-method interface without touching the training code. ``fn`` must be a module-level function
and tasks plain data, because worker processes are started with the *spawn* method (no state
inherited by fork, identical behaviour on every OS).

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
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    """Runs ``fn`` over ``tasks`` and returns the results in task order."""

    def map(self, fn: Callable[[T], R], tasks: Sequence[T],
            labels: Sequence[str] | None = None) -> list[R]: ...


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
        self.bar = tqdm(total=len(labels), desc=desc, unit="group", disable=not enabled,
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

    def map(self, fn: Callable[[T], R], tasks: Sequence[T],
            labels: Sequence[str] | None = None) -> list[R]:
        bar = _Progress(self.desc, _labels(tasks, labels), self.progress)
        out: list[R] = []
        try:
            with torch_threads(self.threads):
                for i, task in enumerate(tasks):
                    bar.set(i, "running")
                    t0 = time.perf_counter()
                    out.append(fn(task))
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

    def map(self, fn: Callable[[T], R], tasks: Sequence[T],
            labels: Sequence[str] | None = None) -> list[R]:
        names = _labels(tasks, labels)
        if not tasks:
            return []
        if self._pool is not None:
            return self._run(self._pool, fn, tasks, names)
        with self._new_pool(min(self.workers, len(tasks))) as pool:
            return self._run(pool, fn, tasks, names)

    def _run(self, pool: cf.ProcessPoolExecutor, fn: Callable[[T], R], tasks: Sequence[T],
             names: list[str]) -> list[R]:
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
                    running[pool.submit(fn, tasks[i])] = (i, time.perf_counter())
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


def make_executor(workers: int | None = None, progress: bool = True) -> Executor:
    """1 worker: in-process (no spawn cost, all cores to torch); more: a process pool."""
    if workers == 1:
        return SerialExecutor(threads=available_cores(), progress=progress)
    return ProcessExecutor(workers, progress=progress)
