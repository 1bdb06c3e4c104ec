"""What stage 1 (full-graph LightGCN + BPR) needs per node, and what data-parallel costs.

    python benchmarks/stage1_plan.py --users 29858 --items 40981 --train 719081 \
        --dim 128 --layers 3 --batch-size 8192 \
        --history docs/results/gowalla/pretrain_history.csv --out docs/results/gowalla

Arithmetic, not a measurement: bytes of the tables, the Adam state, the normalised
adjacency and the activations one full-graph step keeps for backward, the gradient a
data-parallel replica all-reduces per step, and the multiply-adds of full-graph propagation.
With ``--history`` (a committed pretrain_history.csv) the measured seconds per epoch are put
next to them. Writes OUT/stage1_plan.json and OUT/stage1_plan.md.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from pathlib import Path
from typing import Any

from peel.io import write_json, write_text

FLOAT = 4
INDEX = 8  # int64 CSR indices, as scipy/torch build them for these sizes


def plan(users: int, items: int, train: int, dim: int, layers: int,
         batch_size: int) -> dict[str, Any]:
    """Per-node memory and per-step traffic of one full-graph LightGCN replica."""
    nodes = users + items
    table = nodes * dim * FLOAT
    nnz = 2 * train  # both bipartite halves (user->item and item->user)
    adjacency = nnz * (FLOAT + INDEX) + 2 * (nodes + 2) * INDEX
    activations = (layers + 1) * table  # each layer's output kept for backward, + the mean
    params_grad_adam = 4 * table  # parameters, gradient, Adam's two moments
    steps = math.ceil(train / batch_size)
    propagation_flops = 2 * 2 * layers * nnz * dim  # forward + backward SpMM, 2 flops per MAC
    return {
        "inputs": {"users": users, "items": items, "train": train, "dim": dim,
                   "layers": layers, "batch_size": batch_size},
        "nodes": nodes, "adjacency_nnz": nnz,
        "table_mb": table / 1e6, "params_grad_adam_mb": params_grad_adam / 1e6,
        "adjacency_mb": adjacency / 1e6, "activations_mb": activations / 1e6,
        "per_replica_mb": (params_grad_adam + adjacency + activations) / 1e6,
        "steps_per_epoch": steps,
        # a replica's whole table gradient is dense after full-graph propagation
        "allreduce_mb_per_step": table / 1e6,
        "ring_allreduce_gb_per_epoch_per_worker": 2 * table * steps / 1e9,
        # ring all-reduce of that gradient over 10 Gb/s Ethernet (1.25 GB/s), k workers
        "allreduce_ms_10gbe": {str(k): 2 * (k - 1) / k * table / 1.25e9 * 1e3
                               for k in (2, 4, 8)},
        "propagation_gflop_per_step": propagation_flops / 1e9,
        "propagation_gflop_per_epoch": propagation_flops * steps / 1e9,
        # the node count at which one replica fills 64 GB (the same per-node costs scaled)
        "nodes_per_64gb_replica": int(64e9 / ((params_grad_adam + activations) / nodes
                                              + adjacency / nodes)),
    }


def epoch_seconds(history: Path) -> dict[str, Any]:
    with open(history, newline="", encoding="utf-8") as fh:
        secs = [float(row["seconds"]) for row in csv.DictReader(fh)]
    return {"file": str(history), "epochs": len(secs), "median_s": statistics.median(secs),
            "total_s": sum(secs)}


def markdown(p: dict[str, Any]) -> str:
    i = p["inputs"]
    lines = [f"# Stage 1 per node: {i['users']:,} users, {i['items']:,} items, "
             f"{i['train']:,} train interactions, D={i['dim']}, {i['layers']} layers, "
             f"batch {i['batch_size']}", "",
             "Written by `benchmarks/stage1_plan.py` (arithmetic from the counts, float32 "
             "tables, int64 CSR indices).", "",
             "| quantity | value |", "|---|---|"]
    rows = [("nodes (users + items)", f"{p['nodes']:,}"),
            ("adjacency non-zeros (both halves)", f"{p['adjacency_nnz']:,}"),
            ("embedding table", f"{p['table_mb']:.1f} MB"),
            ("table + gradient + Adam moments", f"{p['params_grad_adam_mb']:.1f} MB"),
            ("normalised adjacency (CSR)", f"{p['adjacency_mb']:.1f} MB"),
            ("activations kept for backward", f"{p['activations_mb']:.1f} MB"),
            ("one full-graph replica, total", f"{p['per_replica_mb']:.0f} MB"),
            ("nodes one 64 GB replica holds (this D, this mean degree)",
             f"{p['nodes_per_64gb_replica']:,}"),
            ("steps per epoch", f"{p['steps_per_epoch']}"),
            ("data-parallel all-reduce per step", f"{p['allreduce_mb_per_step']:.1f} MB"),
            ("ring all-reduce per epoch and worker",
             f"{p['ring_allreduce_gb_per_epoch_per_worker']:.1f} GB"),
            ("all-reduce time per step on 10 Gb/s, 2 / 4 / 8 workers",
             " / ".join(f"{v:.0f} ms" for v in p["allreduce_ms_10gbe"].values())),
            ("full-graph propagation per step", f"{p['propagation_gflop_per_step']:.2f} GFLOP"),
            ("full-graph propagation per epoch",
             f"{p['propagation_gflop_per_epoch']:.0f} GFLOP")]
    if "measured" in p:
        m = p["measured"]
        rows.append(("measured seconds per epoch (median, this project's 2 cores)",
                     f"{m['median_s']:.1f} s over {m['epochs']} epochs (`{m['file']}`)"))
        rows.append(("measured seconds per step (median epoch / steps)",
                     f"{m['median_s'] / p['steps_per_epoch']:.2f} s"))
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, required=True)
    ap.add_argument("--items", type=int, required=True)
    ap.add_argument("--train", type=int, required=True)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8192)
    ap.add_argument("--history", type=Path, default=None, help="a pretrain_history.csv")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    p = plan(args.users, args.items, args.train, args.dim, args.layers, args.batch_size)
    if args.history is not None:
        p["measured"] = epoch_seconds(args.history)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "stage1_plan.json", p)
    write_text(args.out / "stage1_plan.md", markdown(p))
    print(markdown(p))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
