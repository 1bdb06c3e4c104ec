"""PEEL against the one-model and fixed-size baselines at each budget, with per-user results.

    python benchmarks/budget_compare.py RUN --out DIR [--split test] \
        [--baselines lightgcn-svd,lightgcn,pmf,bpr-mf,rule] [--tune-trials 4] [--rule cycles=1000]
        [--precisions fp32,auto] [--no-peel]
    python benchmarks/budget_compare.py --summarise DIR [--against LABEL] [--keep-labels]

For one trained run (one seed) this scores, on ``--split``: PEEL through ``peel evaluate``'s
device-runtime code at each budget and with every block kept; the run's pretrained model
(every dimension); and each ``--baselines`` method of ``peel.baselines`` at each budget
(``lightgcn-svd`` and ``rule`` reuse the run's stage 1; ``lightgcn``, ``pmf`` and ``bpr-mf``
are retrained at the largest size that fits, with ``--tune-trials N`` chosen on the validation
split among N trials by :func:`peel.tuning.tune`, the log kept in the row; ``lightgcn-fp16`` /
``lightgcn-int8`` at the largest quantised size, sharing one training per dimension), with
per-user results kept. ``--precisions`` scores PEEL once per package precision rule, labelled
e.g. "PEEL (fp32)" and "PEEL (auto precision)"; without it PEEL is scored with the run's own
[deploy] precision and labelled as the run is. It writes DIR/seed{S}.json (means) and
DIR/per_user_seed{S}.npz (per-user Recall@20 / NDCG@20 of every row, aligned by user).

``--summarise`` reads every seed file in DIR and writes DIR/seeds.json shaped
``{method: {budget: {"recall@20": [...], "ndcg@20": [...]}}}`` (plus any :data:`DETAILS` a
method reports, e.g. RULE's estimator Spearman and times) and DIR/paired.json: for each seed
and budget a Wilcoxon signed-rank test over users of PEEL vs each other method's per-user
Recall@20 (none for a row kept without per-user results); DIR/summary.md tabulates both. A
run scored in parts (one budget per process, say) is joined first by
``benchmarks/combine_seed_files.py``. Reporting only: run it on the test split after every
choice is made.
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
#: Per-budget facts a method may report in its params, carried into seeds.json and summary.md
#: (RULE: its estimator's held-back Spearman, blocks kept and where its time goes).
DETAILS = ("blocks_kept", "estimator_spearman", "winner_valid_recall@20",
           "best_labelled_valid_recall@20", "stage1_seconds", "label_seconds",
           "estimator_seconds", "search_seconds", "deploy_seconds")


#: Fixed-size rows whose full-size model is the run's pretrained one: LightGCN at 100% is stage
#: 1's 128-d LightGCN (issue 14's table defines it so). Retraining it without the diversity term
#: would be a second 128-d training per seed (over 40 min on one core for ml-1m, about 35 min
#: on two for gowalla) for the one row every other budget is compared against anyway.
FULL_SIZE_IS_PRETRAINED = ("LightGCN",)


def _row(result_metrics: dict[str, float], **extra: object) -> dict[str, object]:
    return {**{k: float(result_metrics[k]) for k in METRICS}, **extra}


def rule_overrides(pairs: list[str]) -> dict[str, object]:
    """``--rule cycles=1000`` -> {"cycles": 1000}, typed like RuleConfig's defaults."""
    from peel.baselines.rule import RuleConfig

    base, out = RuleConfig(), {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not hasattr(base, key):
            raise SystemExit(f"--rule {pair!r}: expected KEY=VALUE with KEY a RuleConfig field")
        default = getattr(base, key)
        kind = type(default) if default is not None else (int if value.isdigit() else str)
        out[key] = kind(value)
    return out


def method_budgets(spec: str, budgets: list[str]) -> tuple[str, list[str]]:
    """``"lightgcn-fp16@0.107+0.213"`` -> ("lightgcn-fp16", ["0.107", "0.213"]); a plain name
    takes every budget. Lets one process score a method at a few budgets only (e.g. the one
    whose training another method's budget already paid for)."""
    name, sep, own = spec.partition("@")
    return name, ([b for b in own.split("+") if b] if sep else list(budgets))


def baseline_budget(budget: str, full: int, n_items: int, dim: int) -> int:
    """Bytes a baseline gets at ``budget``. ``"1.0"`` (:data:`ALL`) means the full-size model,
    every one of stage 1's ``dim`` dimensions plus the user vector a device holds: 100% of
    the item table alone would leave a fixed-size model one dimension short (127 of 128)."""
    from peel.baselines.base import fixed_size_bytes
    from peel.budget import parse_budget

    return fixed_size_bytes(dim, n_items) if budget == ALL else parse_budget(budget, full)


def score_run(run: Path, split: str, budgets: list[str], methods: list[str],
              tune_trials: int = 0, on_fit: Callable[[str, str, Any], dict] | None = None,
              rule: dict[str, object] | None = None, precisions: list[str] | None = None,
              peel: bool = True, overrides: dict[str, list[str]] | None = None
              ) -> tuple[dict, dict[str, np.ndarray]]:
    """``on_fit(name, budget, model)``, if given, runs after each baseline is scored and its
    dict joins the row (e.g. device latency); ``rule`` overrides RuleConfig fields;
    ``precisions`` scores PEEL once per package precision rule; ``peel=False`` scores the
    baselines alone (a part joined later with one that scored PEEL: a fixed-size baseline
    needs only the run's data and config, so it can train while the run's stage 2 does);
    ``overrides[name]`` are ``key=value`` changes of the stage-1 config that baseline trains
    with (chosen on validation)."""
    from peel.baselines import REGISTRY, make_baseline
    from peel.budget import full_table_bytes
    from peel.eval import dot_scorer, evaluate
    from peel.overrides import override_fields
    from peel.pipeline import evaluate_peel, load_run_config, run_data, run_precision
    from peel.pretrain import load_embeddings
    from peel.tuning import tune

    cfg = load_run_config(run)
    data = run_data(run)
    full = full_table_bytes(data.n_items, cfg.pretrain.dim)

    def bytes_at(budget: str) -> int:
        return baseline_budget(budget, full, data.n_items, cfg.pretrain.dim)

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
    for precision in (precisions or [None]) if peel else []:
        peel_pu: dict[str, dict[str, np.ndarray]] = {}
        name = cfg.run.label if precision is None else (
            f"{cfg.run.label} ({'auto precision' if precision == 'auto' else precision})")
        t0 = time.perf_counter()
        for r in evaluate_peel(run, data, cfg, list(labels), split=split, per_user_out=peel_pu,
                               precision=precision):
            pu = peel_pu[r.budget]
            keep(name, labels[r.budget], r.metrics, pu, pu["users"], bytes_used=r.bytes_used,
                 precision=run_precision(precision or cfg.deploy.precision, run))
        out["seconds"][f"peel_evaluate {name}"] = time.perf_counter() - t0
    if peel:
        res = evaluate(dot_scorer(*load_embeddings(run / "pretrain")), data, split)
        keep("pretrained", ALL, res.metrics, res.per_user, res.users, dim=cfg.pretrain.dim)
    trained: dict = {}  # lightgcn, -fp16 and -int8 share a training at the same dimension
    for spec in methods:  # every baseline through its peel.baselines class
        name, own_budgets = method_budgets(spec, budgets)
        changes = (overrides or {}).get(name, [])
        pcfg = override_fields(cfg.pretrain, changes, "pretrain")
        model = make_baseline(name, pcfg, run, trained)  # lightgcn-svd rotates once
        same = None if REGISTRY[name].search_space else (lambda _cfg, m=model: m)
        label = model.label
        if name == "rule" and rule:  # a RuleConfig variant, labelled with its changes
            from dataclasses import replace

            model.rule = replace(model.rule, **rule)
            model.rule.validate()
            label += " (" + ", ".join(f"{k}={v}" for k, v in rule.items()) + ")"
        for b in own_budgets:
            t0 = time.perf_counter()
            if tune_trials:  # chosen on validation; the test split is read below, once
                model, _ = tune(name, data, bytes_at(b), pcfg, tune_trials,
                                seed=cfg.run.seed, run=run, make=same)
            else:
                model.fit(data, bytes_at(b))
            res = evaluate(model.scorer(), data, split)
            extra = {**model.params, "bytes_used": model.bytes_used,
                     "seconds": time.perf_counter() - t0}  # params may hold its own seconds
            if changes:
                extra["pretrain_overrides"] = changes
            if on_fit is not None:
                extra.update(on_fit(name, b, model))
            keep(label, b, res.metrics, res.per_user, res.users, **extra)
            print(f"{name} at {b}: {res.metrics['recall@20']:.4f}", flush=True)
    return out, per_user


def summarise(folder: Path, against: str, keep_labels: bool = False) -> None:
    from scipy.stats import wilcoxon

    seeds: dict = {}
    paired: dict = {}
    for path in sorted(folder.glob("seed[0-9]*.json")):
        doc = json.loads(path.read_text())
        pu = np.load(folder / f"per_user_seed{doc['seed']}.npz", allow_pickle=False)
        for method, rows in doc["methods"].items():
            name = "PEEL" if method == against and not keep_labels else method
            for budget, row in rows.items():
                cell = seeds.setdefault(name, {}).setdefault(budget, {})
                for m in ("recall@20", "ndcg@20", *DETAILS):
                    if m in row:
                        cell.setdefault(m, []).append(row[m])
        ours = doc["methods"][against]
        for method, rows in doc["methods"].items():
            if method == against:
                continue
            for budget in rows:
                if budget not in ours or f"{method}|{budget}|recall@20" not in pu:
                    continue  # e.g. a row kept from a run that saved no per-user results
                a = pu[f"{against}|{budget}|recall@20"]
                b = pu[f"{method}|{budget}|recall@20"]
                stat = wilcoxon(a, b, zero_method="wilcox") if np.any(a != b) else None
                paired.setdefault(str(doc["seed"]), {}).setdefault(method, {})[budget] = {
                    "mean_diff_recall@20": float((a - b).mean()),
                    "users": len(a),
                    "wilcoxon_p": None if stat is None else float(stat.pvalue),
                }
    full_size_rows(seeds, paired)
    (folder / "seeds.json").write_text(json.dumps(seeds, indent=2) + "\n")
    (folder / "paired.json").write_text(json.dumps(paired, indent=2) + "\n")
    table = markdown(seeds, paired, against if keep_labels else "PEEL")
    (folder / "summary.md").write_text(table)
    print(table)


def full_size_rows(seeds: dict, paired: dict) -> None:
    """Give each :data:`FULL_SIZE_IS_PRETRAINED` method the pretrained model's row (and paired
    tests) at :data:`ALL` where it has none, marked ``"same_model_as": "pretrained"``."""
    for method in FULL_SIZE_IS_PRETRAINED:
        if method not in seeds or ALL in seeds[method] or ALL not in seeds.get("pretrained", {}):
            continue
        seeds[method][ALL] = {**seeds["pretrained"][ALL], "same_model_as": "pretrained"}
        for per_seed in paired.values():
            if ALL in per_seed.get("pretrained", {}):  # even where its budgets have none
                per_seed.setdefault(method, {})[ALL] = per_seed["pretrained"][ALL]


def markdown(seeds: dict, paired: dict, ours: str = "PEEL") -> str:
    """Means over seeds (Recall@20 / NDCG@20) and, per budget, ``ours`` minus each method with
    the paired tests' p-values, one per seed."""
    budgets = sorted({b for rows in seeds.values() for b in rows}, key=float)
    n = max(len(c["recall@20"]) for rows in seeds.values() for c in rows.values())
    lines = [f"Mean over {n} seed(s), Recall@20 / NDCG@20", "",
             "| method | " + " | ".join(budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for method, rows in seeds.items():
        cells = [(f"{np.mean(rows[b]['recall@20']):.4f} / {np.mean(rows[b]['ndcg@20']):.4f}"
                  if b in rows else "") for b in budgets]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [f"\n{method} at {b} is the {rows[b]['same_model_as']} model's row."
              for method, rows in seeds.items() for b in budgets
              if "same_model_as" in rows.get(b, {})]
    lines += ["", f"{ours} minus method, Recall@20 per seed (Wilcoxon signed-rank p over users)",
              "",
              "| method | budget | per seed |", "|---|---|---|"]
    methods = sorted({m for per_seed in paired.values() for m in per_seed})
    for method in methods:
        for b in budgets:
            tests = [p[method][b] for p in paired.values() if b in p.get(method, {})]
            cells = [f"{t['mean_diff_recall@20']:+.4f} (p={t['wilcoxon_p']:.2g})"
                     for t in tests if t["wilcoxon_p"] is not None]
            if cells:
                lines.append(f"| {method} | {b} | " + "; ".join(cells) + " |")
    return "\n".join(lines + details(seeds, budgets)) + "\n"


def details(seeds: dict, budgets: list[str]) -> list[str]:
    """Means over seeds of the :data:`DETAILS` a method reported (none: no table)."""
    keys = [k for k in DETAILS if any(k in c for rows in seeds.values() for c in rows.values())]
    if not keys:
        return []
    lines = ["", "Details, mean over seeds (seconds: upper bounds, shared machine)", "",
             "| method | budget | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for method, rows in seeds.items():
        for b in budgets:
            cell = rows.get(b, {})
            if any(k in cell for k in keys):
                vals = [f"{np.mean(cell[k]):.4g}" if k in cell else "" for k in keys]
                lines.append(f"| {method} | {b} | " + " | ".join(vals) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, nargs="?")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--split", default="test", choices=("valid", "test"))
    ap.add_argument("--budgets", default="0.107,0.213,0.533")
    ap.add_argument("--baselines", default="lightgcn-svd",
                    help="comma-separated peel.baselines names, e.g. "
                         "lightgcn-svd,lightgcn,pmf,bpr-mf,rule; NAME@B1+B2 scores NAME at "
                         "those budgets only")
    ap.add_argument("--tune-trials", type=int, default=0,
                    help="validation trials per baseline and budget (0: configured setting)")
    ap.add_argument("--rule", action="append", default=[], metavar="KEY=VALUE",
                    help="RuleConfig override for the rule baseline, e.g. --rule cycles=1000")
    ap.add_argument("--precisions", default="",
                    help="score PEEL once per precision rule, e.g. fp32,auto (default: the "
                         "run's [deploy] precision, one row labelled as the run)")
    ap.add_argument("--no-peel", action="store_true",
                    help="score the baselines only (PEEL and the pretrained model are scored "
                         "by another part; join them with combine_seed_files.py)")
    ap.add_argument("--summarise", type=Path, help="folder of seed files to summarise")
    ap.add_argument("--against", default="PEEL", help="the run's label in the seed files")
    ap.add_argument("--keep-labels", action="store_true",
                    help="keep every method's label (default: --against becomes PEEL)")
    args = ap.parse_args()
    if args.summarise:
        summarise(args.summarise, args.against, args.keep_labels)
        return
    if args.run is None or args.out is None:
        ap.error("RUN and --out are required unless --summarise is given")
    args.out.mkdir(parents=True, exist_ok=True)
    doc, per_user = score_run(args.run, args.split, args.budgets.split(","),
                              [m for m in args.baselines.split(",") if m], args.tune_trials,
                              rule=rule_overrides(args.rule),
                              precisions=[p for p in args.precisions.split(",") if p] or None,
                              peel=not args.no_peel)
    (args.out / f"seed{doc['seed']}.json").write_text(json.dumps(doc, indent=2) + "\n")
    np.savez(args.out / f"per_user_seed{doc['seed']}.npz", **per_user)
    for method, rows in doc["methods"].items():
        print(method, {b: round(r["recall@20"], 4) for b, r in rows.items()})


if __name__ == "__main__":
    main()
