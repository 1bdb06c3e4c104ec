"""Stage-2 variants on one trained run, measured on the VALIDATION split only.

    python benchmarks/stage2_variants.py BASE_RUN --out DIR \
        --variants "paper:" "svd:finetune.init=svd_group;finetune.transform=identity" ...

Every variant reuses BASE_RUN's stage 1 (pretrained embeddings; same data and [pretrain]),
applies its ``section.key=value`` overrides (as ``peel train --set``), fine-tunes every user
group into DIR/NAME (a variant without overrides is BASE_RUN's own stage 2, not retrained),
and is ranked by ``peel evaluate``'s own device-runtime code on the validation split at each
budget and with every block kept (``--executor ray`` fine-tunes each variant's groups as
Ray tasks, one Ray for the whole sweep; the figures are the same). Two references are
printed with it: the pretrained model itself (every dimension) and ``lightgcn-svd`` (the
pretrained model truncated along the singular directions of its score matrix to the largest
size that fits each budget). One JSON line per variant is appended to DIR/results.jsonl.
The test split is never read here, so decisions made from this table rest on validation
only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

from peel.baselines import make_baseline
from peel.budget import full_table_bytes, parse_budget
from peel.eval import dot_scorer, evaluate
from peel.executor import make_executor
from peel.overrides import apply_overrides
from peel.pipeline import evaluate_peel, load_run_config, reuse_pretrain, run_data, train
from peel.pretrain import load_embeddings

ALL_BLOCKS = "all"  # a budget large enough to keep every block


def references(base: Path, data, budgets: list[str], dim: int) -> dict[str, dict[str, float]]:
    """Validation Recall/NDCG@20 of the pretrained model and of ``lightgcn-svd``."""
    full = evaluate(dot_scorer(*load_embeddings(base / "pretrain")), data, "valid").metrics
    svd = {}
    model = make_baseline("lightgcn-svd", load_run_config(base).pretrain, base)  # one rotation
    for b in budgets:
        model.fit(data, parse_budget(b, full_table_bytes(data.n_items, dim)))
        svd[b] = {**evaluate(model.scorer(), data, "valid").metrics, "dim": model.params["dim"]}
    return {"pretrained": {ALL_BLOCKS: full}, "lightgcn-svd": svd}


def run_variant(base: Path, out: Path, name: str, sets: list[str], budgets: list[str],
                data, executor=None) -> dict[str, dict[str, float]]:
    cfg = apply_overrides(load_run_config(base), sets)
    folder, seconds = base, 0.0
    if sets:  # no overrides: the base run's own stage 2, as trained
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        reuse_pretrain(base, folder, cfg)
        t0 = time.perf_counter()
        train(cfg, folder, progress=False, data=data, executor=executor)
        seconds = time.perf_counter() - t0
    full = full_table_bytes(data.n_items, cfg.pretrain.dim)
    labels = [*budgets, str(full + 10**6)]
    rows = evaluate_peel(folder, data, cfg, labels, split="valid")
    res = {r.budget if r.budget != labels[-1] else ALL_BLOCKS: r.metrics for r in rows}
    res["seconds"] = {"finetune": seconds}
    return res


def cell(metrics: dict[str, float] | None) -> str:
    if not metrics:
        return "-"
    return f"{metrics['recall@20']:.4f} / {metrics['ndcg@20']:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path, help="a run folder with stage 1 done (peel train)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budgets", default="0.107,0.213,0.533")
    ap.add_argument("--variants", nargs="+", required=True,
                    help='"NAME:section.key=value;section.key=value" (empty overrides allowed)')
    ap.add_argument("--executor", default="local", choices=["local", "ray"],
                    help="where each variant's group fine-tuning runs (ray: Ray tasks)")
    ap.add_argument("--ray-address", default=None, help="auto | HOST:PORT (default: local Ray)")
    ap.add_argument("--workers", type=int, default=None, help="group tasks at a time")
    args = ap.parse_args()
    cfg = load_run_config(args.base)
    data = run_data(args.base)
    budgets = args.budgets.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    refs = references(args.base, data, budgets, cfg.pretrain.dim)
    cols = [*budgets, ALL_BLOCKS]
    print(f"{args.base} ({data.name}), VALIDATION Recall@20 / NDCG@20")
    print("| method | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    print("| pretrained | " + " | ".join(cell(refs["pretrained"].get(c)) for c in cols) + " |")
    print("| lightgcn-svd | " + " | ".join(cell(refs["lightgcn-svd"].get(c)) for c in cols)
          + " |", flush=True)
    executor = None  # local: each variant's own run.workers processes
    if args.executor == "ray" or args.workers is not None:
        executor = make_executor(args.workers or cfg.run.workers, progress=False,
                                 backend=args.executor, address=args.ray_address,
                                 threads_per_worker=cfg.finetune.threads)
    with open(args.out / "results.jsonl", "a", encoding="utf-8") as log, \
            executor if executor is not None else contextlib.nullcontext():
        log.write(json.dumps({"base": str(args.base), "split": "valid", "references": refs})
                  + "\n")
        for spec in args.variants:
            name, _, raw = spec.partition(":")
            sets = [kv for kv in raw.split(";") if kv]
            res = run_variant(args.base, args.out, name, sets, budgets, data, executor)
            print(f"| {name} | " + " | ".join(cell(res.get(c)) for c in cols) + " |", flush=True)
            log.write(json.dumps({"base": str(args.base), "split": "valid", "variant": name,
                                  "sets": sets, "metrics": res}) + "\n")
            log.flush()


if __name__ == "__main__":
    main()
