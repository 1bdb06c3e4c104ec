"""Wall-clock of group fine-tuning and baselines: local executor vs local Ray, 1 and 2 workers.

    python benchmarks/scaling.py BASE_RUN --results docs/results/DATASET [--work /tmp/scaling]

BASE_RUN is a trained run; its stage 1 is reused (``--reuse-pretrain``), so stage 2 alone is
timed, once per executor configuration (``local`` = the process executor ``peel train`` uses,
``ray`` = :class:`peel.executor.RayExecutor` on a local Ray started with that many CPUs). The
baselines (``--baselines``, default pmf at the paper's three budgets) are trained for a short,
stated epoch cap (``--baseline-epochs``): this measures scaling, not accuracy, so the rows'
metrics are not reported, only checked to be identical across executors. The same is checked
bit for bit for every group file. A no-op micro-benchmark gives the executors' overhead per
task with the real shared tables. Writes RESULTS/scaling.json and RESULTS/scaling.md; every
time is an upper bound (shared machine). Run it from the folder BASE_RUN's relative data
path was written from (the repository root of the main checkout for /work/runs/...).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peel import __version__
from peel.elastic import SharedTables
from peel.executor import ProcessExecutor, RayExecutor, SerialExecutor, available_cores
from peel.io import write_json, write_text
from peel.pipeline import (
    PAPER_BUDGETS,
    evaluate_baselines,
    load_run_config,
    reuse_pretrain,
    run_data,
    train,
)
from peel.pretrain import load_embeddings

CONFIGS = ("local:1", "local:2", "ray:1", "ray:2")


def make(spec: str, threads: int, desc: str) -> tuple[Any, str, int]:
    """(executor, backend, workers) of ``backend:workers``; local 1 is in-process, as in
    ``peel train --workers 1``."""
    backend, _, n = spec.partition(":")
    workers = int(n)
    if backend == "ray":
        return RayExecutor(None, workers, threads, progress=False, desc=desc), backend, workers
    if backend != "local":
        raise SystemExit(f"unknown executor {spec!r}; expected local:N or ray:N")
    if workers == 1:
        return SerialExecutor(threads=None, progress=False, desc=desc), backend, workers
    return ProcessExecutor(workers, threads, progress=False, desc=desc), backend, workers


def digests(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((run / "groups").glob("group_*.npz"))}


def time_finetune(base: Path, work: Path, spec: str, cfg: Any, data: Any) -> dict[str, Any]:
    """Stage 2 of BASE_RUN into a fresh folder (stage 1 copied) with one executor."""
    folder = work / f"finetune-{spec.replace(':', '-')}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    reuse_pretrain(base, folder, cfg)
    ex, backend, workers = make(spec, cfg.finetune.threads, "groups")
    t0 = time.perf_counter()
    with ex:
        startup = time.perf_counter() - t0
        summary = train(cfg, folder, progress=False, data=data, executor=ex)
    task_s = [g["seconds"] for g in summary["groups"]]
    wall = summary["seconds"]["finetune"]
    return {"executor": backend, "workers": workers, "startup_s": startup, "wall_s": wall,
            "tasks": len(task_s), "task_s_sum": float(np.sum(task_s)),
            "task_s_max": float(np.max(task_s)),
            # the executor's own cost per task, exact with one worker (no idle tail)
            "overhead_per_task_s": (wall - float(np.sum(task_s))) / len(task_s)
            if workers == 1 else None,
            "digests": digests(folder), "folder": str(folder)}


def time_baselines(spec: str, cfg: Any, data: Any, budgets: list[str], methods: list[str],
                   base: Path) -> dict[str, Any]:
    """Every method x budget; ``local:1`` is ``peel evaluate``'s own loop (no executor)."""
    ex, backend, workers = make(spec, 1, "baselines")
    t0 = time.perf_counter()
    with ex:
        startup = time.perf_counter() - t0
        t1 = time.perf_counter()
        rows = evaluate_baselines(data, cfg, budgets, progress=False, methods=methods,
                                  run=base, split="test",
                                  executor=None if spec == "local:1" else ex)
        wall = time.perf_counter() - t1
    # test metrics are hashed, never printed: this benchmark decides nothing
    key = [(r.method, r.budget, r.bytes_used, r.metrics) for r in rows]
    return {"executor": backend, "workers": workers, "startup_s": startup, "wall_s": wall,
            "tasks": len(rows), "task_s": [r.detail.get("seconds") for r in rows],
            "rows_sha256": hashlib.sha256(json.dumps(key, sort_keys=True).encode())
            .hexdigest()}


def noop(task: int, shared: SharedTables) -> int:
    """Touches the shared tables, so a worker must have received them."""
    return task + int(shared.item_emb.shape[0] > 0)


def time_overhead(spec: str, shared: SharedTables, n: int) -> dict[str, Any]:
    ex, backend, workers = make(spec, 1, "noop")
    with ex:
        ex.map(noop, list(range(workers)), shared=shared)  # start and warm every worker
        t0 = time.perf_counter()
        assert ex.map(noop, list(range(n)), shared=shared) == [i + 1 for i in range(n)]
        wall = time.perf_counter() - t0
    return {"executor": backend, "workers": workers, "tasks": n, "wall_s": wall,
            "per_task_s": wall / n}


def put_seconds(shared: SharedTables) -> float:
    import ray

    ray.init(num_cpus=1, include_dashboard=False, logging_level="warning")
    try:
        t0 = time.perf_counter()
        ray.get(ray.put(shared))
        return time.perf_counter() - t0
    finally:
        ray.shutdown()


def speedups(rows: list[dict[str, Any]]) -> None:
    ref = next(r["wall_s"] for r in rows if (r["executor"], r["workers"]) == ("local", 1))
    for r in rows:
        r["speedup_vs_local1"] = ref / r["wall_s"]


def markdown(res: dict[str, Any]) -> str:
    out = [f"# Scaling on {res['dataset']['name']} ({res['dataset']['n_users']:,} users, "
           f"{res['dataset']['n_items']:,} items, {res['dataset']['n_train']:,} train "
           "interactions)", "",
           f"Written by `benchmarks/scaling.py` on {res['machine']['cores']} cores "
           f"({res['machine']['cpu']}); every time is an upper bound (shared machine). "
           f"Stage 2 reuses stage 1 of `{res['base_run']}`; baselines: "
           f"{', '.join(res['baselines']['methods'])} at {', '.join(res['baselines']['budgets'])}"
           f" with pretrain.epochs={res['baselines']['epochs']} (a scaling measurement, not "
           "an accuracy one). `startup` is starting the executor (Ray: a local Ray); "
           "`wall` excludes it.", "",
           "| stage | executor | workers | wall s | startup s | speed-up vs local x1 | "
           "identical to local x1 |", "|---|---|---|---|---|---|---|"]
    for stage, rows in (("group fine-tuning", res["finetune"]),
                        ("baselines", res["baselines"]["runs"])):
        for r in rows:
            out.append(f"| {stage} | {r['executor']} | {r['workers']} | {r['wall_s']:.1f} | "
                       f"{r['startup_s']:.1f} | {r['speedup_vs_local1']:.2f} | "
                       f"{'yes' if r['identical'] else 'NO'} |")
    out += ["", "Overhead per task (no-op task reading the shared tables, workers warm; "
            f"{res['overhead']['shared_mb']:.1f} MB of shared tables, put into Ray's object "
            f"store once in {res['overhead']['ray_put_s']:.3f} s):", "",
            "| executor | workers | tasks | s per task |", "|---|---|---|---|"]
    for r in res["overhead"]["runs"]:
        out.append(f"| {r['executor']} | {r['workers']} | {r['tasks']} | "
                   f"{r['per_task_s'] * 1e3:.1f} ms |")
    one = [r for r in res["finetune"] if r["workers"] == 1]
    if one:
        out += ["", "Fine-tuning with one worker: wall minus the groups' own seconds, per group "
                "(the executor's cost in a real run):", ""]
        out += [f"- {r['executor']} x1: {r['overhead_per_task_s']:.2f} s per group "
                f"({r['tasks']} groups, {r['task_s_sum']:.1f} s inside the groups)" for r in one]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path, help="a trained run whose stage 1 is reused")
    ap.add_argument("--results", type=Path, required=True, help="folder for scaling.json/.md")
    ap.add_argument("--work", type=Path, default=Path("/tmp/peel-scaling"),
                    help="scratch folder for the fine-tuned runs (removed after hashing)")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help="executor:workers list; local:1 comes first (the reference)")
    ap.add_argument("--baselines", default="pmf")
    ap.add_argument("--budgets", default=",".join(PAPER_BUDGETS))
    ap.add_argument("--baseline-epochs", type=int, default=2)
    ap.add_argument("--noop-tasks", type=int, default=200)
    ap.add_argument("--keep", action="store_true", help="keep the fine-tuned runs in --work")
    args = ap.parse_args(argv)
    import ray

    configs = args.configs.split(",")
    if configs[0] != "local:1":
        raise SystemExit("--configs must start with local:1, the reference")
    cfg = load_run_config(args.base)
    data = run_data(args.base, cfg)
    budgets, methods = args.budgets.split(","), args.baselines.split(",")
    base_cfg = replace(cfg, pretrain=replace(cfg.pretrain, epochs=args.baseline_epochs))
    print(f"{data.name}: {data.n_users} users, {data.n_items} items, {data.train.nnz} train; "
          f"torch threads in this process: {torch.get_num_threads()}", flush=True)

    finetune = []
    for spec in configs:
        print(f"fine-tuning, {spec} ...", flush=True)
        row = time_finetune(args.base, args.work, spec, cfg, data)
        row["identical"] = row["digests"] == (finetune[0]["digests"] if finetune
                                              else row["digests"])
        folder = Path(row.pop("folder"))
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        finetune.append(row)
        print(f"  {row['wall_s']:.1f}s (+{row['startup_s']:.1f}s start), identical: "
              f"{row['identical']}", flush=True)
    ref_digests = finetune[0]["digests"]
    for row in finetune:
        row.pop("digests")
    speedups(finetune)

    baselines = []
    for spec in configs:
        print(f"baselines, {spec} ...", flush=True)
        row = time_baselines(spec, base_cfg, data, budgets, methods, args.base)
        row["identical"] = row["rows_sha256"] == (baselines[0]["rows_sha256"] if baselines
                                                  else row["rows_sha256"])
        baselines.append(row)
        print(f"  {row['wall_s']:.1f}s (+{row['startup_s']:.1f}s start), identical: "
              f"{row['identical']}", flush=True)
    speedups(baselines)

    _, item_emb = load_embeddings(args.base / "pretrain")
    shared = SharedTables(np.ascontiguousarray(item_emb, dtype=np.float32),
                          np.zeros(data.n_items, dtype=np.int64))
    overhead = [time_overhead(spec, shared, args.noop_tasks) for spec in configs]
    res = {
        "peel_version": __version__, "ray_version": ray.__version__,
        "torch_version": torch.__version__, "command": [sys.executable, *sys.argv],
        "base_run": str(args.base), "seed": cfg.run.seed,
        "machine": {"cores": available_cores(), "cpu": platform.processor() or
                    platform.machine(), "torch_threads_driver": torch.get_num_threads(),
                    "note": "upper bound, shared machine"},
        "dataset": {"name": data.name, "n_users": data.n_users, "n_items": data.n_items,
                    "n_train": int(data.train.nnz)},
        "finetune": finetune, "group_digests": ref_digests,
        "finetune_config": asdict(cfg.finetune),
        "baselines": {"methods": methods, "budgets": budgets,
                      "epochs": args.baseline_epochs, "runs": baselines},
        "overhead": {"shared_mb": (shared.item_emb.nbytes + shared.item_group.nbytes) / 1e6,
                     "ray_put_s": put_seconds(shared), "runs": overhead},
    }
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / "scaling.json", res)
    write_text(args.results / "scaling.md", markdown(res))
    print(markdown(res))
    return 0 if all(r["identical"] for r in finetune + baselines) else 1


if __name__ == "__main__":
    sys.exit(main())
