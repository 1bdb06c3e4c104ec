"""Per-user ranking latency of a device model, against the memory-read floor (numpy only).

What a phone runs is timed in a process of its own that imports numpy and the device runtimes
(:mod:`peel.device`, :mod:`peel.device_compressed`) only, never torch or scipy. A simulated
device (:data:`DEVICES`) is that process with:

* ``threads`` CPUs: the BLAS thread variables set before numpy loads and the process pinned to
  that many cores (``os.sched_setaffinity``, where the platform has it);
* a memory cap: ``resource.setrlimit(RLIMIT_AS)`` set, once the interpreter, numpy and the
  runtime are loaded, to the address space they occupy plus ``memory_mb``. The model (a package
  is memory-mapped, other models are read into memory), the users' vectors and every buffer of
  the ranking must fit in those ``memory_mb``; an allocation beyond them fails and the run is
  reported as over the cap. (A cap on the whole process cannot be the device's RAM: CPython
  and numpy alone reserve ~150 MB of address space, of which ~35 MB is resident; a phone's
  native runtime would not.) Peak resident memory (``ru_maxrss``) is reported with the
  resident size before the model was loaded.

The floor of a model is what reading its bytes once and picking a top-K must cost: one float32
matrix-vector product over a dense (rows, 128) array of the same bytes as the model's item
data, plus ``np.argpartition`` of one score per item (``benchmarks/device_latency.py`` uses
the same :func:`floor_inputs` / :func:`floor_step`).

Run as a worker: ``python -m peel.latency SPEC.json RESULT.json`` (what
:func:`peel.experiments.latency` does for every method, budget and device).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Values a floor's dense array has per row (a 128-d float32 table: 512 bytes a row).
FLOOR_WIDTH = 128
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class Device:
    """A simulated device: CPUs the ranking may use and the memory it may take."""

    name: str
    threads: int
    memory_mb: int


#: The paper's two settings (Table IV): IoT = 1 vCPU, 64 MB; cellphone = 4 vCPUs, 512 MB.
#: This machine has 2 cores, so the cellphone gets 2 threads.
DEVICES = {"iot": Device("iot", 1, 64), "cellphone": Device("cellphone", 2, 512)}


def percentiles_ms(seconds: list[float] | np.ndarray) -> dict[str, float]:
    arr = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)),
            "mean_ms": float(arr.mean())}


def floor_inputs(nbytes: int, n_items: int, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A dense float32 (rows, 128) array of ``nbytes`` (at least one row), a query and one
    score per item: the inputs of :func:`floor_step`."""
    rng = np.random.default_rng(seed)
    rows = max(int(nbytes) // (4 * FLOOR_WIDTH), 1)
    dense = rng.standard_normal((rows, FLOOR_WIDTH), dtype=np.float32)
    vec = rng.standard_normal(FLOOR_WIDTH, dtype=np.float32)
    scores = rng.standard_normal(n_items, dtype=np.float32)
    return dense, vec, scores


def floor_step(dense: np.ndarray, vec: np.ndarray, scores: np.ndarray, k: int) -> None:
    """Read every byte once (a matrix-vector product) and pick a top-``k`` (argpartition)."""
    dense @ vec
    n = scores.shape[0]
    np.argpartition(scores, max(n - k, 0))


# --------------------------------------------------------------------------- rankers


def _csr_rows(arrays: dict[str, np.ndarray]) -> Callable[[int], np.ndarray]:
    indptr, indices = arrays["exclude_indptr"], arrays["exclude_indices"]
    return lambda b: indices[indptr[b]: indptr[b + 1]]


def _package_ranker(spec: dict[str, Any], arrays: dict[str, np.ndarray]
                    ) -> Callable[[int], Any]:
    from peel.device import open_package

    pkg = open_package(spec["model"])
    users, rows, k = arrays["users"], _csr_rows(arrays), int(spec["k"])
    return lambda b: pkg.rank(users[b], k, rows(b))


def _scores_ranker(score: Callable[[np.ndarray], np.ndarray], arrays: dict[str, np.ndarray],
                   k: int) -> Callable[[int], Any]:
    from peel.device_compressed import top_k

    users, indptr, indices = arrays["users"], arrays["exclude_indptr"], arrays["exclude_indices"]

    def rank(b: int) -> np.ndarray:
        ex = indices[indptr[b]: indptr[b + 1]]
        return top_k(score(users[b]), k, np.array([0, ex.size]), ex)

    return rank


def _model_ranker(spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> Callable[[int], Any]:
    """A dot-product table (float32 or row-wise quantised), DLRM-CE's two tables or
    LightRec's codebooks, ranked with :mod:`peel.device_compressed`; ESAPN's / AutoEmb's
    per-size tables with :mod:`peel.device_multidim`."""
    from peel import device_compressed as dc
    from peel import device_multidim as dm

    with np.load(spec["model"], allow_pickle=False) as z:
        model = {name: z[name] for name in z.files}
    kind, k = spec["kind"], int(spec["k"])
    if kind == "dot":
        item = model["item_emb"]
        return _scores_ranker(lambda u: item @ u, arrays, k)
    if kind == "qr":
        q, r, n, op = model["q"], model["r"], int(spec["n_items"]), str(spec["op"])
        return _scores_ranker(lambda u: dc.qr_scores(u[None], q, r, n, op)[0], arrays, k)
    if kind == "lightrec":
        books, codes = model["codebooks"], model["codes"]
        return _scores_ranker(lambda u: dc.lightrec_scores(u[None], books, codes)[0], arrays, k)
    if kind == "multidim":
        sizes, method = tuple(int(s) for s in spec["sizes"]), str(spec["method"])
        return _scores_ranker(lambda u: dm.lifted_scores(u[None], model, sizes, method)[0],
                              arrays, k)
    if kind == "quantized":
        values, scale = model["values"], model.get("scale")
        qk, dim = int(spec["quant_kind"]), int(spec["dim"])
        return _scores_ranker(lambda u: dc.quantized_scores(u[None], qk, values, scale, dim)[0],
                              arrays, k)
    raise ValueError(f"unknown model kind {kind!r}")


def _floor_ranker(spec: dict[str, Any]) -> Callable[[int], Any]:
    dense, vec, scores = floor_inputs(int(spec["nbytes"]), int(spec["n_items"]))
    k = int(spec["k"])
    return lambda b: floor_step(dense, vec, scores, k)


def make_ranker(spec: dict[str, Any]) -> Callable[[int], Any]:
    """``rank(b)``: the top-k of the spec's b-th user, as the device computes it."""
    if spec["kind"] == "floor":
        return _floor_ranker(spec)
    with np.load(spec["users"], allow_pickle=False) as z:
        arrays = {name: z[name] for name in z.files}
    if spec["kind"] == "package":
        return _package_ranker(spec, arrays)
    return _model_ranker(spec, arrays)


# --------------------------------------------------------------------------- the worker


def _status_kb(field: str) -> int | None:
    path = Path("/proc/self/status")
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _cap_memory(memory_mb: int) -> dict[str, Any]:
    """RLIMIT_AS = the address space now (interpreter + numpy + runtime) + ``memory_mb``."""
    import resource

    now_kb = _status_kb("VmSize")
    if now_kb is None:  # pragma: no cover - non-Linux: no cap, said in the result
        return {"cap": "none (no /proc/self/status)"}
    limit = now_kb * 1024 + memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return {"cap": "RLIMIT_AS", "address_space_before_mb": now_kb / 1024,
            "limit_mb": limit / 2**20}


def _pin(threads: int) -> list[int] | None:
    if not hasattr(os, "sched_setaffinity"):  # pragma: no cover - macOS, Windows
        return None
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)
    return cpus


def time_ranker(rank: Callable[[int], Any], n_users: int, warmup: int, reps: int = 1
                ) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of each call, after ``warmup`` untimed calls."""
    for b in range(min(warmup, n_users)):
        rank(b)
    wall, cpu = [], []
    for _ in range(reps):
        for b in range(n_users):
            w0, c0 = time.perf_counter(), time.process_time()
            rank(b)
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
    return wall, cpu


def _items(result: Any) -> list[int]:
    """The item indices of one ranking (a package's ``Ranking`` or a (1, k) array)."""
    items = np.asarray(getattr(result, "items", result)).reshape(-1)
    return [int(i) for i in items if i >= 0]


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the spec's model under its device's cap and time one top-k per user; with
    ``floor_bytes``, then the floor of that many bytes in the same process."""
    device = Device(**spec["device"])
    out: dict[str, Any] = {"cpus": _pin(device.threads),
                           "rss_before_model_mb": (_status_kb("VmRSS") or 0) / 1024}
    out.update(_cap_memory(device.memory_mb))
    out.update(_timed(spec, device))
    out["peak_rss_mb"] = _peak_rss_mb()  # the model's peak, before any floor is allocated
    if spec.get("floor_bytes"):  # then the floor of the same bytes, in the same process
        floor = {**spec, "kind": "floor", "nbytes": spec["floor_bytes"]}
        out["floor"] = {**_timed(floor, device), "peak_rss_mb": _peak_rss_mb()}
    out["imports"] = {m: m in sys.modules for m in ("torch", "scipy")}  # must stay False
    out["ru_maxrss_mb"] = _ru_maxrss_mb()
    return out


def _peak_rss_mb() -> float:
    """This process's peak resident size: ``VmHWM`` (reset by exec) where Linux has it.
    ``getrusage(RUSAGE_SELF).ru_maxrss`` is not: Linux carries the forking parent's peak
    across fork + exec, so a worker started from a big process reports the parent's peak
    (:func:`_ru_maxrss_mb`, recorded alongside)."""
    hwm = _status_kb("VmHWM")
    return hwm / 1024 if hwm is not None else _ru_maxrss_mb()


def _ru_maxrss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def _timed(spec: dict[str, Any], device: Device) -> dict[str, Any]:
    """Load the spec's model and time it; a failure (e.g. over the cap) is a status."""
    import gc

    out: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        rank = make_ranker(spec)
        out["load_ms"] = (time.perf_counter() - t0) * 1e3
        wall, cpu = time_ranker(rank, int(spec["n_users"]), int(spec.get("warmup", 10)),
                                int(spec.get("reps", 1)))
        out.update(percentiles_ms(wall), cpu_p50_ms=percentiles_ms(cpu)["p50_ms"],
                   timed_calls=len(wall), status="ok")
        if spec["kind"] != "floor":  # what was timed, for checks against the method
            out["first_user_items"] = _items(rank(0))
    except (MemoryError, OSError, ValueError) as err:  # an allocation or mmap over the cap
        out["status"] = f"failed under the {device.memory_mb} MB cap: {type(err).__name__}"
        out["error"] = str(err)[:300]
    rank = None  # free the model before anything else is allocated under the cap
    gc.collect()
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m peel.latency SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    result = run_spec(spec)
    Path(args[1]).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
