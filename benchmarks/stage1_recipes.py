"""Stage 1's training recipe chosen on the VALIDATION split: each recipe trained to its own
early stop, best validation Recall@20 / NDCG@20, epochs and seconds.

    python benchmarks/stage1_recipes.py DATA --out DIR [--seed 0] [--dim 128] [--minutes 20]
                                        [--epochs 40]
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
from dataclasses import asdict, replace
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


def _point(rec: dict) -> dict:
    """One evaluation of a training log as a recipe's trace keeps it."""
    return {"epoch": rec["epoch"], "elapsed": rec["elapsed"], "loss": rec["loss"],
            "recall@20": rec["valid"]["recall@20"], "ndcg@20": rec["valid"]["ndcg@20"]}


def _row(name: str, trace: list[dict], best_epoch: int, seconds: float, **extra: object
         ) -> dict:
    """A recipe's row: its best validation point, cost and whole trace."""
    best = max(trace, key=lambda t: t["recall@20"])
    return {"recipe": name, "overrides": RECIPES[name], "best_epoch": best_epoch,
            "best_recall@20": best["recall@20"], "best_ndcg@20": best["ndcg@20"],
            "seconds_to_best": best["elapsed"], "seconds": seconds,
            "epochs": len(trace), "trace": trace, **extra}


def run_recipe(data: object, base: PretrainConfig, name: str) -> dict:
    """Train one recipe to its early stop; its validation trace and best epoch."""
    cfg = replace(base, **RECIPES[name])
    cfg.validate()
    trace: list[dict] = []

    def on_eval(rec: dict, emb: object) -> None:
        if "valid" in rec:
            trace.append(_point(rec))

    t0 = time.perf_counter()
    result = pretrain(data, cfg, progress=False, on_eval=on_eval)
    return _row(name, trace, result.best_epoch, time.perf_counter() - t0)


#: Config fields that do not change what a recipe learns (or are capped separately).
NOT_COMPARED = frozenset({"epochs", "max_minutes", "device", "eval_batch_size"})


def reused_recipe(run: Path, base: PretrainConfig, name: str) -> dict:
    """A recipe's row from a finished run's stage 1 instead of a new training.

    The run's stage-1 config must equal the recipe's in every field that changes what is
    learned; its validation trace is cut at ``base.epochs`` (training is causal, so the cut
    trace is what the capped training would have seen). Its seconds come from that run's
    machine and load, and the row says so (``reused_from``)."""
    cfg = replace(base, **RECIPES[name])
    saved = json.loads((run / "pretrain" / "pretrain_config.json").read_text())
    # a field the run's file lacks is one added since, at its default (which changes nothing)
    had = {k: tuple(v) if isinstance(v, list) else v
           for k, v in {**asdict(PretrainConfig()), **saved}.items()}
    differ = sorted(k for k, v in asdict(cfg).items()
                    if k not in NOT_COMPARED and had.get(k) != v)
    if differ:
        raise SystemExit(f"--reuse {name}={run}: its stage 1 differs from recipe {name!r} in "
                         + ", ".join(f"{k} ({had.get(k)!r} != {getattr(cfg, k)!r})"
                                     for k in differ))
    log = json.loads((run / "pretrain" / "pretrain_log.json").read_text())
    trace = [_point(r) for r in log["history"] if "valid" in r and r["epoch"] <= cfg.epochs]
    best = max(trace, key=lambda t: t["recall@20"])
    return _row(name, trace, best["epoch"], trace[-1]["elapsed"], reused_from=str(run))


def decide(rows: list[dict]) -> str:
    """The rule of the module docstring."""
    top = max(r["best_recall@20"] for r in rows)
    tied = [r for r in rows if r["best_recall@20"] >= top - TIE]
    return min(tied, key=lambda r: r["seconds_to_best"])["recipe"]


def markdown(doc: dict) -> str:
    cap = "".join(f"; at most {doc[k]} {unit} per recipe" for k, unit in
                  (("epochs_cap", "epochs"), ("minutes_cap", "minutes")) if doc.get(k))
    lines = [f"Validation split, {doc['dataset']}, seed {doc['seed']}, {doc['dim']}-d stage 1"
             f" (machine: {doc['machine']}; seconds are upper bounds on a shared machine{cap})",
             "",
             "| recipe | overrides | best val. Recall@20 | NDCG@20 | best epoch | s to best |",
             "|---|---|---|---|---|---|"]
    for r in doc["recipes"]:
        name = r["recipe"] + (f" (the trace of {r['reused_from']})" if "reused_from" in r else "")
        lines.append(f"| {name} | {json.dumps(r['overrides'])} | {r['best_recall@20']:.4f}"
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
    ap.add_argument("--epochs", type=int, default=None,
                    help="epoch cap per recipe (unlike --minutes, the same on a busy machine)")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--reuse", action="append", default=[], metavar="RECIPE=RUN",
                    help="take RECIPE's row from RUN's finished stage 1 (same config) instead "
                         "of training it again")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="DIR",
                    help="instead of training: join the recipe files of these folders (recipes "
                         "run in parallel processes, same data, seed and caps) into --out")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, args.out, args.seed)
        return
    names = [n for n in args.recipes.split(",") if n]
    reuse = dict(item.split("=", 1) for item in args.reuse)
    unknown = (set(names) | set(reuse)) - set(RECIPES)
    if unknown:
        raise SystemExit(f"--recipes: unknown {sorted(unknown)}; expected any of {list(RECIPES)}")
    data = load_dataset(args.data)
    base = PretrainConfig(dim=args.dim, seed=args.seed, max_minutes=args.minutes)
    if args.epochs is not None:
        base = replace(base, epochs=args.epochs)
    stem = args.out / f"stage1_recipes_valid_seed{args.seed}"
    rows: list[dict] = []
    for name in names:
        rows.append(reused_recipe(Path(reuse[name]), base, name) if name in reuse
                    else run_recipe(data, base, name))
        print(f"{name}: best val Recall@20 {rows[-1]['best_recall@20']:.4f}"
              f" at epoch {rows[-1]['best_epoch']}", flush=True)
        doc = {"dataset": data.name, "seed": args.seed, "dim": args.dim,
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
               "minutes_cap": args.minutes, "epochs_cap": args.epochs, "recipes": rows,
               "decision": decide(rows)}
        write(stem, doc)  # after each recipe
    print(markdown(doc))


def write(stem: Path, doc: dict) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_json(stem.with_suffix(".json"), doc)  # atomically
    write_text(stem.with_suffix(".md"), markdown(doc))


def merge(folders: list[Path], out: Path, seed: int) -> None:
    """One recipe file from several made with the same data, seed, width and caps."""
    name = f"stage1_recipes_valid_seed{seed}.json"
    docs = [json.loads((f / name).read_text()) for f in folders]
    keys = ("dataset", "seed", "dim", "minutes_cap", "epochs_cap")
    if len({tuple(d.get(k) for k in keys) for d in docs}) != 1:
        raise SystemExit("--merge: the folders differ in " + ", ".join(keys))
    rows = [r for d in docs for r in d["recipes"]]
    order = {n: i for i, n in enumerate(RECIPES)}
    rows.sort(key=lambda r: order.get(r["recipe"], len(order)))
    doc = {**docs[0], "recipes": rows, "decision": decide(rows)}
    write(out / name[:-5], doc)
    print(markdown(doc))


if __name__ == "__main__":
    main()
