"""Device ranking latency against the memory-read floor, and instant-shrink time.

Builds synthetic group packages like Amazon-Book's (91,599 items, N=16, d=8, G_v=20) at 10.7%,
21.3% and 53.3% of the full 128-d float32 table (about 5, 10 and 25 MB), for every package
precision in ``--precisions`` (float32 blocks, float16, int8 with per-row scales, ...), then on
one thread:

* per-user top-50 through ``Package.rank`` (with 40 excluded items per user, about a training
  history), p50 and p99 over many users: the whole ranking, products, decoding, exclusions
  and top-K selection;
* the block products alone (``scores`` without exclusions or top-K), p50;
* every time both as wall-clock and as the CPU time of the ranking thread (``thread_time``),
  which on a shared machine leaves out the time spent waiting for a core;
* the floor, timed interleaved with it: one float32 matrix-vector product over a dense
  (rows, 128) array with the same bytes as the package's item blocks, plus ``np.argpartition``
  of 91,599 scores, i.e. what reading the bytes the package holds once and picking a top-50
  must cost (a float16 or int8 package holds 2x or ~3x the values in those bytes);
* shrinking each precision's 53.3% package to 10.7% in memory (must copy nothing) and checking
  that it ranks exactly like a package built at 10.7%.

Prints figures, never asserts (it is not a test). ``--json`` prints one JSON object instead;
``--out FILE`` also writes it to FILE. On a shared machine every figure is an upper bound.
Run: ``OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 .venv/bin/python
benchmarks/device_latency.py``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # must precede the numpy import to take effect

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from peel.device import Package, open_package, shrink_file  # noqa: E402
from peel.package import (  # noqa: E402
    DEFAULT_PRECISION,
    DeployOptions,
    GroupArrays,
    build_package,
    synthetic_group,
)

FRACTIONS = (0.107, 0.213, 0.533)
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class BenchConfig:
    n_items: int = 91_599
    n_blocks: int = 16
    block_dim: int = 8
    n_item_groups: int = 20
    k: int = 50
    users: int = 400
    exclude: int = 40
    shrink_reps: int = 200
    seed: int = 0


def synthetic(cfg: BenchConfig) -> GroupArrays:
    return synthetic_group(cfg.n_items, cfg.n_blocks, cfg.block_dim, cfg.n_item_groups,
                           cfg.users, cfg.seed)


def _ms(seconds: list[float]) -> tuple[float, float]:
    arr = np.asarray(seconds) * 1e3
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def time_ranking(pkg: Package, arrays: GroupArrays, cfg: BenchConfig) -> dict[str, float]:
    """Per-user rank latency and the floor, interleaved so load from neighbours hits both."""
    rng = np.random.default_rng(cfg.seed + 1)
    n = cfg.n_items
    dense = rng.standard_normal((max(pkg.report.item_blocks // 512, 1), 128), dtype=np.float32)
    vec = rng.standard_normal(128, dtype=np.float32)
    floor_scores = rng.standard_normal(n, dtype=np.float32)
    excludes = [rng.choice(n, cfg.exclude, replace=False) for _ in range(cfg.users)]
    for u in range(min(20, cfg.users)):  # warm-up: page in the file, build views
        pkg.rank(arrays.user_emb[u], cfg.k, excludes[u])
        dense @ vec
    wall: dict[str, list[float]] = {k: [] for k in ("floor", "rank", "matvec", "scores")}
    cpu: dict[str, list[float]] = {k: [] for k in wall}
    mode = pkg._mode(None, None, None)
    steps = {
        "floor": lambda u: (dense @ vec, np.argpartition(floor_scores, n - cfg.k)),
        "rank": lambda u: pkg.rank(arrays.user_emb[u], cfg.k, excludes[u]),
        "matvec": lambda u: dense @ vec,
        "scores": lambda u: pkg._row_scores(arrays.user_emb[u], mode),  # products alone
    }
    for u in range(cfg.users):
        for name, step in steps.items():
            w0, c0 = time.perf_counter(), time.thread_time()
            step(u)
            c1, w1 = time.thread_time(), time.perf_counter()
            wall[name].append(w1 - w0)
            cpu[name].append(c1 - c0)
    p50, p99 = _ms(wall["rank"])
    f50, _ = _ms(wall["floor"])
    t0 = time.perf_counter()
    pkg.rank_batch(arrays.user_emb, cfg.k)
    batch = (time.perf_counter() - t0) / cfg.users * 1e3
    # CPU time of this thread: on a shared machine it leaves out the time the thread waited
    # for a core (cache contention from neighbours still counts, so it is an upper bound)
    c = {f"cpu_{k}_ms": _ms(v)[0] for k, v in cpu.items()}
    return {"p50_ms": p50, "p99_ms": p99, "floor_ms": f50, "ratio": p50 / f50,
            "matvec_ms": _ms(wall["matvec"])[0], "scores_ms": _ms(wall["scores"])[0],
            "batch_ms_per_user": batch, **c,
            "cpu_ratio": c["cpu_rank_ms"] / c["cpu_floor_ms"],
            "cpu_products_ratio": c["cpu_scores_ms"] / c["cpu_matvec_ms"]}


def time_shrink(big: Package, direct: Package, arrays: GroupArrays, cfg: BenchConfig,
                workdir: Path) -> dict[str, object]:
    """In-memory shrink time; checks it copies nothing and matches a direct build."""
    big.rank(arrays.user_emb[0], cfg.k)  # the views a running device already has
    times, cpu = [], []
    small = big
    for _ in range(cfg.shrink_reps):
        t0, c0 = time.perf_counter(), time.thread_time()
        small = big.shrink(direct.budget)
        cpu.append(time.thread_time() - c0)
        times.append(time.perf_counter() - t0)
    p50, p99 = _ms(times)
    pairs = [(small.rank(arrays.user_emb[u], cfg.k), direct.rank(arrays.user_emb[u], cfg.k))
             for u in range(20)]
    same = all(np.array_equal(a.items, b.items) and np.array_equal(a.scores, b.scores)
               for a, b in pairs)
    t0 = time.perf_counter()
    shrink_file(big.source, workdir / "shrunk.peel", direct.budget)
    file_ms = (time.perf_counter() - t0) * 1e3
    same_bytes = (workdir / "shrunk.peel").read_bytes() == Path(direct.source).read_bytes()
    return {
        "p50_ms": p50, "p99_ms": p99, "max_ms": max(times) * 1e3, "cpu_p50_ms": _ms(cpu)[0],
        "shrink_file_ms": file_ms, "file_identical_to_direct": same_bytes,
        "blocks_shared": bool(np.shares_memory(small.blocks, big.blocks)),
        "blocks_before": big.n_selected, "blocks_after": small.n_selected,
        "same_selection_as_direct": bool(np.array_equal(small.selection, direct.selection)),
        "same_ranking_as_direct": bool(same),
    }


def run(cfg: BenchConfig, workdir: Path, precisions: tuple[str, ...] = PRECISIONS
        ) -> dict[str, object]:
    arrays = synthetic(cfg)
    full = cfg.n_items * cfg.n_blocks * cfg.block_dim * 4
    rows: list[dict[str, object]] = []
    shrinks: dict[str, dict[str, object]] = {}
    for precision in precisions:
        packages: dict[float, Package] = {}
        options = DeployOptions(precision=precision)
        for frac in FRACTIONS:
            path = workdir / f"pkg_{precision}_{frac}.peel"
            report = build_package(path, arrays, frac, options=options)
            t0 = time.perf_counter()
            pkg = open_package(path)
            open_ms = (time.perf_counter() - t0) * 1e3
            packages[frac] = pkg
            rows.append({"precision": precision, "fraction": frac, "budget": report.budget,
                         "blocks": report.n_selected, "kinds": pkg.kind_counts(),
                         "open_verify_ms": open_ms, "report": report.to_dict(),
                         **time_ranking(pkg, arrays, cfg)})
        shrinks[precision] = time_shrink(packages[FRACTIONS[-1]], packages[FRACTIONS[0]],
                                         arrays, cfg, workdir)
    return {"config": cfg.__dict__, "full_table_bytes": full, "budgets": rows,
            "shrink": shrinks, "auto": DEFAULT_PRECISION, "numpy": np.__version__}


def print_table(result: dict[str, object]) -> None:
    print(f"device ranking, one thread, {result['config']['n_items']:,} items, top-"
          f"{result['config']['k']} (numpy {result['numpy']}; auto = {result['auto']})")
    print("CPU time of the ranking thread, p50 ms (wall-clock p50 / p99 after |):")
    print(f"{'precision':>9} {'budget':>14} {'blocks':>6} {'rank':>7} {'floor':>7} "
          f"{'ratio':>6} {'products':>8} {'matvec':>7} {'ratio':>6} | {'rank':>7} {'p99':>7} "
          f"{'floor':>7} {'ratio':>6} {'batch/u':>8} {'open':>7}")
    for r in result["budgets"]:
        label = f"{r['fraction']:.1%} {r['budget'] / 1e6:.2f}MB"
        print(f"{r['precision']:>9} {label:>14} {r['blocks']:>6} {r['cpu_rank_ms']:>7.3f} "
              f"{r['cpu_floor_ms']:>7.3f} {r['cpu_ratio']:>6.2f} {r['cpu_scores_ms']:>8.3f} "
              f"{r['cpu_matvec_ms']:>7.3f} {r['cpu_products_ratio']:>6.2f} | "
              f"{r['p50_ms']:>7.3f} {r['p99_ms']:>7.3f} {r['floor_ms']:>7.3f} "
              f"{r['ratio']:>6.2f} {r['batch_ms_per_user']:>8.3f} {r['open_verify_ms']:>7.1f}")
    print("\naccounting (group package; user embedding reserved), bytes:")
    parts = ("item_blocks", "user_embedding", "item_index", "selection", "header", "padding",
             "total", "file_bytes")
    heads = "".join(f"{r['precision'] + ' ' + format(r['fraction'], '.1%'):>16}"
                    for r in result["budgets"])
    print(f"{'part':>15}" + heads)
    for part in parts:
        print(f"{part:>15}" + "".join(f"{r['report'][part]:>16,}" for r in result["budgets"]))
    print(f"{'budget':>15}" + "".join(f"{r['budget']:>16,}" for r in result["budgets"]))
    for precision, s in result["shrink"].items():
        print(f"\n{precision}: shrink {FRACTIONS[-1]:.1%} -> {FRACTIONS[0]:.1%} in memory: CPU p50 "
              f"{s['cpu_p50_ms']:.3f} ms; wall p50 {s['p50_ms']:.3f} ms, p99 {s['p99_ms']:.3f} ms, "
              f"max {s['max_ms']:.3f} ms; blocks "
              f"{s['blocks_before']} -> {s['blocks_after']}; shares memory (no copy): "
              f"{s['blocks_shared']}; same selection / ranking as a direct build: "
              f"{s['same_selection_as_direct']} / {s['same_ranking_as_direct']}")
        print(f"shrink_file (verify, prefix copy, new checksum): {s['shrink_file_ms']:.1f} ms; "
              f"file identical to a direct build: {s['file_identical_to_direct']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--users", type=int, default=BenchConfig.users)
    parser.add_argument("--seed", type=int, default=BenchConfig.seed)
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help="package precision rules to time (auto = the default rule)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    cfg = BenchConfig(users=args.users, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="peel-bench-") as tmp:
        result = run(cfg, Path(tmp), tuple(p for p in args.precisions.split(",") if p))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
