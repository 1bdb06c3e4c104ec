"""Should each run choose its own precision rule? Cross-fitted on the validation split.

    python benchmarks/precision_per_run.py RUN [RUN ...] --out DIR [--write-choice]
    python benchmarks/precision_per_run.py --combine DIR [DIR ...] --out FILE.md

A run's "auto" rule is chosen on its own validation users (:mod:`peel.autoprecision`). Scoring
that choice on the same users would flatter it, so this script cross-fits: validation users
are split by user id parity; the rule chosen on one half (by the library's own
:func:`peel.autoprecision.decide`) is scored on the other half, and each user counts once.
Every fixed rule is scored on all users. Everything here is VALIDATION; this script cannot
read the test split, because it is used to decide.

Per run it writes DIR/per_run_valid_seed{S}.json and .md. ``--write-choice`` also stores the
run's choice made on all its validation users as RUN/precision.json, exactly what ``peel
train`` would write, so the figures are not computed twice.

Decision rule, fixed before any figure was read: the per-run choice becomes the default
(``[deploy] precision_candidates`` non-empty) if its cross-fitted Recall@20, averaged over
budgets and seeds, is higher than the fixed default's (the first candidate) averaged over the
datasets (each dataset counts once), and on no dataset lower than the fixed default's by more
than the choice's own tie (0.0005). Otherwise "auto" stays the fixed default.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from peel import runfolder
from peel.autoprecision import METRIC, TIE, choice_document, decide, score_candidates
from peel.io import write_json
from peel.pipeline import load_run_config, run_data


def half_results(per_user: dict, budgets: list[str], half: int) -> dict[str, dict[str, dict]]:
    """rule -> budget -> {METRIC: mean over the users of one parity half}."""
    out: dict[str, dict[str, dict]] = {}
    for rule, by_budget in per_user.items():
        out[rule] = {}
        for b in budgets:
            mask = by_budget[b]["users"] % 2 == half
            out[rule][b] = {METRIC: float(by_budget[b][METRIC][mask].mean())}
    return out


def crossfit(per_user: dict, candidates: list[str], budgets: list[str]) -> dict:
    """Each half scored by the rule chosen on the other half; each user counted once."""
    chosen = {h: decide(half_results(per_user, budgets, h), candidates)[0] for h in (0, 1)}
    scores = {}
    for b in budgets:
        total, n = 0.0, 0
        for h in (0, 1):
            row = per_user[chosen[1 - h]][b]
            mask = row["users"] % 2 == h
            total += float(row[METRIC][mask].sum())
            n += int(mask.sum())
        scores[b] = total / n
    return {"chosen_on_half": {str(h): chosen[h] for h in (0, 1)}, METRIC: scores,
            "mean": float(np.mean(list(scores.values())))}


def score_run(run: Path, write_choice: bool) -> dict:
    cfg = load_run_config(run)
    data = run_data(run, cfg)
    candidates = list(cfg.deploy.precision_candidates)
    budgets = list(cfg.deploy.budgets)
    per_user: dict = {}
    results, seconds = score_candidates(run, data, cfg, candidates, budgets,
                                        per_user_out=per_user, progress=True)
    doc = choice_document(run, cfg, candidates, budgets, results, seconds)
    if write_choice:
        write_json(run / runfolder.PRECISION_FILE, doc)
    fixed = {rule: {b: results[rule][b][METRIC] for b in budgets} for rule in candidates}
    return {"run": str(run), "dataset": data.name, "seed": cfg.run.seed, "split": "valid",
            "candidates": candidates, "budgets": budgets, "chosen_on_all": doc["rule"],
            "fixed": fixed,
            "fixed_mean": {r: float(np.mean(list(v.values()))) for r, v in fixed.items()},
            "crossfit": crossfit(per_user, candidates, budgets), "seconds": seconds,
            "tie": TIE}


def run_markdown(doc: dict) -> str:
    b = doc["budgets"]
    lines = [f"Validation split, {doc['dataset']}, seed {doc['seed']} (run {doc['run']}); "
             f"{METRIC} per budget and its mean", "",
             "| rule | " + " | ".join(b) + " | mean |", "|---" * (len(b) + 2) + "|"]
    for rule, row in doc["fixed"].items():
        lines.append(f"| {rule} (fixed) | " + " | ".join(f"{row[x]:.4f}" for x in b)
                     + f" | {doc['fixed_mean'][rule]:.4f} |")
    cf = doc["crossfit"]
    lines.append("| per-run choice, cross-fitted | " + " | ".join(
        f"{cf[METRIC][x]:.4f}" for x in b) + f" | {cf['mean']:.4f} |")
    lines += ["", f"Chosen on all validation users: **{doc['chosen_on_all']}**; on the even / "
              f"odd halves: {cf['chosen_on_half']['0']} / {cf['chosen_on_half']['1']}."]
    return "\n".join(lines) + "\n"


def combine(dirs: list[Path]) -> tuple[str, dict]:
    docs = [json.loads(p.read_text()) for d in dirs for p in sorted(d.glob("per_run_valid_*.json"))]
    if not docs:
        raise SystemExit("no per_run_valid_*.json files in " + ", ".join(map(str, dirs)))
    default = docs[0]["candidates"][0]
    by_data: dict[str, list[dict]] = {}
    for doc in docs:
        by_data.setdefault(doc["dataset"], []).append(doc)
    rows = {}
    for name, group in sorted(by_data.items()):
        rows[name] = {"seeds": [d["seed"] for d in group],
                      "per_run": float(np.mean([d["crossfit"]["mean"] for d in group])),
                      "fixed": {r: float(np.mean([d["fixed_mean"][r] for d in group]))
                                for r in group[0]["candidates"]},
                      "chosen": [d["chosen_on_all"] for d in group]}
    per_run = float(np.mean([r["per_run"] for r in rows.values()]))
    fixed = float(np.mean([r["fixed"][default] for r in rows.values()]))
    worst = min(r["per_run"] - r["fixed"][default] for r in rows.values())
    adopt = per_run > fixed and worst >= -TIE
    lines = [f"Validation {METRIC}, mean over budgets and seeds; per-run choice cross-fitted "
             "(each half of the users scored by the rule chosen on the other half)", "",
             "| dataset | seeds | per-run choice | fixed " + default + " | every fixed rule | "
             "chosen on all users |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        every = ", ".join(f"{k} {v:.4f}" for k, v in r["fixed"].items())
        lines.append(f"| {name} | {', '.join(map(str, r['seeds']))} | {r['per_run']:.4f} | "
                     f"{r['fixed'][default]:.4f} | {every} | {', '.join(r['chosen'])} |")
    lines += ["", f"Mean over datasets: per-run {per_run:.4f}, fixed {default} {fixed:.4f}; "
              f"worst dataset difference {worst:+.4f}.", "",
              "Decision (rule in the script's docstring): **"
              + ("per-run choice" if adopt else f"fixed {default}") + "**"]
    return "\n".join(lines) + "\n", {"datasets": rows, "per_run": per_run, "fixed": fixed,
                                     "worst": worst, "adopt_per_run": adopt,
                                     "default": default}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="*")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--write-choice", action="store_true")
    ap.add_argument("--combine", type=Path, nargs="+")
    args = ap.parse_args()
    if args.combine:
        text, doc = combine(args.combine)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
        print(text)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        doc = score_run(run, args.write_choice)
        stem = args.out / f"per_run_valid_seed{doc['seed']}"
        stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
        stem.with_suffix(".md").write_text(run_markdown(doc))
        print(run_markdown(doc), flush=True)


if __name__ == "__main__":
    main()
