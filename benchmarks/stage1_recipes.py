"""Stage 1's training recipe chosen on the VALIDATION split: each recipe trained to its own
early stop, best validation Recall@20 / NDCG@20, epochs and seconds.

    python benchmarks/stage1_recipes.py DATA --out DIR [--seed 0] [--dim 128] [--minutes 20]
                                        [--recipes paper,uniform-fast,dns8,default]

Every recipe is the project's default :class:`peel.pretrain.PretrainConfig` (diversity term
included, so this is stage 1 itself) with only the optimiser fields of :data:`RECIPES`
changed; each trains with the default patience on the validation split. The test split is
never read: this chooses a default (issue 13). Writes DIR/stage1_recipes_valid_seed{S}.json
(every evaluation of every recipe) and .md (the table and the decision).

Decision rule, fixed before the numbers were seen: the recipe with the highest best validation
Recall@20; a recipe within 0.0005 of the best counts as tied and the cheaper one (fewer
seconds to its best epoch) wins.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

from peel.data import load_dataset
from peel.io import write_json, write_text
from peel.pretrain import PretrainConfig, pretrain

#: name -> PretrainConfig overrides (optimiser fields only)
RECIPES: dict[str, dict[str, object]] = {
    "paper": {"sampling": "uniform", "lr": 1e-3, "lr_half_life": 0},
    "uniform-fast": {"sampling": "uniform", "lr": 1e-2, "lr_half_life": 375},
    "dns8": {"sampling": "dns", "dns_candidates": 8, "lr": 1e-2, "lr_half_life": 375},
    "default": {},  # DNS with 32 candidates, lr 1e-2 halved every 375 steps
}
TIE = 5e-4


def run_recipe(data: object, base: PretrainConfig, name: str) -> dict:
    """Train one recipe to its early stop; its validation trace and best epoch."""
    cfg = replace(base, **RECIPES[name])
    cfg.validate()
    trace: list[dict] = []

    def on_eval(rec: dict, emb: object) -> None:
        if "valid" in rec:
            trace.append({"epoch": rec["epoch"], "elapsed": rec["elapsed"], "loss": rec["loss"],
                          "recall@20": rec["valid"]["recall@20"],
                          "ndcg@20": rec["valid"]["ndcg@20"]})

    t0 = time.perf_counter()
    result = pretrain(data, cfg, progress=False, on_eval=on_eval)
    best = max(trace, key=lambda t: t["recall@20"])
    return {"recipe": name, "overrides": RECIPES[name], "best_epoch": result.best_epoch,
            "best_recall@20": best["recall@20"], "best_ndcg@20": best["ndcg@20"],
            "seconds_to_best": best["elapsed"], "seconds": time.perf_counter() - t0,
            "epochs": len(trace), "trace": trace}


def decide(rows: list[dict]) -> str:
    """The rule of the module docstring."""
    top = max(r["best_recall@20"] for r in rows)
    tied = [r for r in rows if r["best_recall@20"] >= top - TIE]
    return min(tied, key=lambda r: r["seconds_to_best"])["recipe"]


def markdown(doc: dict) -> str:
    lines = [f"Validation split, {doc['dataset']}, seed {doc['seed']}, {doc['dim']}-d stage 1"
             f" (machine: {doc['machine']}; seconds are upper bounds on a shared machine)", "",
             "| recipe | overrides | best val. Recall@20 | NDCG@20 | best epoch | s to best |",
             "|---|---|---|---|---|---|"]
    for r in doc["recipes"]:
        lines.append(f"| {r['recipe']} | {json.dumps(r['overrides'])} | {r['best_recall@20']:.4f}"
                     f" | {r['best_ndcg@20']:.4f} | {r['best_epoch']} |"
                     f" {r['seconds_to_best']:.0f} |")
    lines += ["", f"Decision (highest best validation Recall@20, ties within {TIE} to the "
              f"cheaper): **{doc['decision']}**"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dim", type=int, default=PretrainConfig.dim)
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock cap per recipe")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    args = ap.parse_args()
    names = [n for n in args.recipes.split(",") if n]
    unknown = set(names) - set(RECIPES)
    if unknown:
        raise SystemExit(f"--recipes: unknown {sorted(unknown)}; expected any of {list(RECIPES)}")
    data = load_dataset(args.data)
    base = PretrainConfig(dim=args.dim, seed=args.seed, max_minutes=args.minutes)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"stage1_recipes_valid_seed{args.seed}"
    rows: list[dict] = []
    for name in names:
        rows.append(run_recipe(data, base, name))
        print(f"{name}: best val Recall@20 {rows[-1]['best_recall@20']:.4f}"
              f" at epoch {rows[-1]['best_epoch']}", flush=True)
        doc = {"dataset": data.name, "seed": args.seed, "dim": args.dim,
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
               "minutes_cap": args.minutes, "recipes": rows, "decision": decide(rows)}
        write_json(stem.with_suffix(".json"), doc)  # after each recipe, atomically
        write_text(stem.with_suffix(".md"), markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
