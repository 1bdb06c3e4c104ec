"""PEEL against the one-model and fixed-size baselines at each budget, with per-user results.

    python benchmarks/budget_compare.py RUN --out DIR [--split test] \
        [--baselines lightgcn-svd,lightgcn,pmf]
    python benchmarks/budget_compare.py --summarise DIR     # seeds.json + paired tests

For one trained run (one seed) this scores, on ``--split``: PEEL through ``peel evaluate``'s
device-runtime code at each budget and with every block kept; the run's pretrained model
(every dimension); and each ``--baselines`` method of ``peel.baselines`` at each budget
(``lightgcn-svd`` reuses the run's stage 1; ``lightgcn`` and ``pmf`` are retrained at the
largest size that fits), with per-user results kept. It writes DIR/seed{S}.json (means) and
DIR/per_user_seed{S}.npz (per-user Recall@20 / NDCG@20 of every row, aligned by user).

``--summarise`` reads every seed file in DIR and writes DIR/seeds.json shaped
``{method: {budget: {"recall@20": [...], "ndcg@20": [...]}}}`` plus DIR/paired.json: for each
seed and budget a Wilcoxon signed-rank test over users of PEEL vs each other method's
per-user Recall@20. Reporting only: run it on the test split after every choice is made.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ALL = "1.0"  # budget key of "every block kept" / the full pretrained model
METRICS = ("recall@20", "ndcg@20", "recall@50", "ndcg@50")


def _row(result_metrics: dict[str, float], **extra: object) -> dict[str, object]:
    return {**{k: float(result_metrics[k]) for k in METRICS}, **extra}


def score_run(run: Path, split: str, budgets: list[str], methods: list[str],
              on_fit: Callable[[str, str, Any], dict] | None = None,
              overrides: dict[str, list[str]] | None = None
              ) -> tuple[dict, dict[str, np.ndarray]]:
    """``on_fit(name, budget, model)``, if given, runs after each baseline is scored and its
    dict joins the row (e.g. device latency); ``overrides[name]`` are ``key=value`` changes
    of the stage-1 config that baseline trains with (values chosen on validation)."""
    from peel.baselines import make_baseline
    from peel.budget import full_table_bytes, parse_budget
    from peel.eval import dot_scorer, evaluate
    from peel.overrides import override_fields
    from peel.pipeline import evaluate_peel, load_run_config, run_data
    from peel.pretrain import load_embeddings

    cfg = load_run_config(run)
    data = run_data(run)
    full = full_table_bytes(data.n_items, cfg.pretrain.dim)
    out: dict = {"run": str(run), "seed": cfg.run.seed, "split": split, "dataset": data.name,
                 "methods": {}, "seconds": {}}
    per_user: dict[str, np.ndarray] = {}

    def keep(method: str, budget: str, means: dict[str, float], pu: dict[str, np.ndarray],
             users: np.ndarray, **extra: object) -> None:
        out["methods"].setdefault(method, {})[budget] = _row(means, **extra)
        order = np.argsort(users)
        for m in ("recall@20", "ndcg@20"):
            per_user[f"{method}|{budget}|{m}"] = np.asarray(pu[m])[order]
        per_user["users"] = users[order]

    labels = {b: b for b in budgets} | {str(full + 10**6): ALL}
    peel_pu: dict[str, dict[str, np.ndarray]] = {}
    t0 = time.perf_counter()
    for r in evaluate_peel(run, data, cfg, list(labels), split=split, per_user_out=peel_pu):
        pu = peel_pu[r.budget]
        keep(cfg.run.label, labels[r.budget], r.metrics, pu, pu["users"],
             bytes_used=r.bytes_used)
    out["seconds"]["peel_evaluate"] = time.perf_counter() - t0
    res = evaluate(dot_scorer(*load_embeddings(run / "pretrain")), data, split)
    keep("pretrained", ALL, res.metrics, res.per_user, res.users, dim=cfg.pretrain.dim)
    for name in methods:  # every baseline through its peel.baselines class
        changes = (overrides or {}).get(name, [])
        pcfg = override_fields(cfg.pretrain, changes, "pretrain")
        model = make_baseline(name, pcfg, run)  # lightgcn-svd rotates once here
        for b in budgets:
            t0 = time.perf_counter()
            model.fit(data, parse_budget(b, full))
            res = evaluate(model.scorer(), data, split)
            extra = {**model.params, "bytes_used": model.bytes_used,
                     "seconds": time.perf_counter() - t0}  # params may hold its own seconds
            if changes:
                extra["pretrain_overrides"] = changes
            if on_fit is not None:
                extra.update(on_fit(name, b, model))
            keep(model.label, b, res.metrics, res.per_user, res.users, **extra)
            print(f"{name} at {b}: {res.metrics['recall@20']:.4f}", flush=True)
    return out, per_user


def summarise(folder: Path, against: str) -> None:
    from scipy.stats import wilcoxon

    seeds: dict = {}
    paired: dict = {}
    for path in sorted(folder.glob("seed[0-9]*.json")):
        doc = json.loads(path.read_text())
        pu = np.load(folder / f"per_user_seed{doc['seed']}.npz", allow_pickle=False)
        for method, rows in doc["methods"].items():
            name = "PEEL" if method == against else method
            for budget, row in rows.items():
                cell = seeds.setdefault(name, {}).setdefault(budget, {})
                for m in ("recall@20", "ndcg@20"):
                    cell.setdefault(m, []).append(row[m])
        ours = doc["methods"][against]
        for method, rows in doc["methods"].items():
            if method == against:
                continue
            for budget in rows:
                if budget not in ours:
                    continue
                a = pu[f"{against}|{budget}|recall@20"]
                b = pu[f"{method}|{budget}|recall@20"]
                stat = wilcoxon(a, b, zero_method="wilcox") if np.any(a != b) else None
                paired.setdefault(str(doc["seed"]), {}).setdefault(method, {})[budget] = {
                    "mean_diff_recall@20": float((a - b).mean()),
                    "users": len(a),
                    "wilcoxon_p": None if stat is None else float(stat.pvalue),
                }
    (folder / "seeds.json").write_text(json.dumps(seeds, indent=2) + "\n")
    (folder / "paired.json").write_text(json.dumps(paired, indent=2) + "\n")
    table = markdown(seeds, paired)
    (folder / "summary.md").write_text(table)
    print(table)


def markdown(seeds: dict, paired: dict) -> str:
    """Means over seeds (Recall@20 / NDCG@20) and, per budget, PEEL minus each method with the
    paired tests' p-values, one per seed."""
    budgets = sorted({b for rows in seeds.values() for b in rows}, key=float)
    n = max(len(c["recall@20"]) for rows in seeds.values() for c in rows.values())
    lines = [f"Mean over {n} seed(s), Recall@20 / NDCG@20", "",
             "| method | " + " | ".join(budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for method, rows in seeds.items():
        cells = [(f"{np.mean(rows[b]['recall@20']):.4f} / {np.mean(rows[b]['ndcg@20']):.4f}"
                  if b in rows else "") for b in budgets]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "PEEL minus method, Recall@20 per seed (Wilcoxon signed-rank p over users)", "",
              "| method | budget | per seed |", "|---|---|---|"]
    methods = sorted({m for per_seed in paired.values() for m in per_seed})
    for method in methods:
        for b in budgets:
            tests = [p[method][b] for p in paired.values() if b in p.get(method, {})]
            cells = [f"{t['mean_diff_recall@20']:+.4f} (p={t['wilcoxon_p']:.2g})"
                     for t in tests if t["wilcoxon_p"] is not None]
            if cells:
                lines.append(f"| {method} | {b} | " + "; ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, nargs="?")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--split", default="test", choices=("valid", "test"))
    ap.add_argument("--budgets", default="0.107,0.213,0.533")
    ap.add_argument("--baselines", default="lightgcn-svd",
                    help="comma-separated peel.baselines names, e.g. lightgcn-svd,lightgcn,pmf")
    ap.add_argument("--summarise", type=Path, help="folder of seed files to summarise")
    ap.add_argument("--against", default="PEEL", help="the run's label in the seed files")
    args = ap.parse_args()
    if args.summarise:
        summarise(args.summarise, args.against)
        return
    if args.run is None or args.out is None:
        ap.error("RUN and --out are required unless --summarise is given")
    args.out.mkdir(parents=True, exist_ok=True)
    doc, per_user = score_run(args.run, args.split, args.budgets.split(","),
                              [m for m in args.baselines.split(",") if m])
    (args.out / f"seed{doc['seed']}.json").write_text(json.dumps(doc, indent=2) + "\n")
    np.savez(args.out / f"per_user_seed{doc['seed']}.npz", **per_user)
    for method, rows in doc["methods"].items():
        print(method, {b: round(r["recall@20"], 4) for b, r in rows.items()})


if __name__ == "__main__":
    main()
