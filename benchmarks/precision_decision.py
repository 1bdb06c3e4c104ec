"""Choose ``precision="auto"`` from the validation files of several runs and datasets.

    python benchmarks/precision_decision.py DIR [DIR ...] --out FILE.md

Each DIR holds ``precision_valid_seed*.json`` files written by ``precision_rules.py`` (one
per run; runs of the same dataset are seeds of it). Validation split only: those files hold
no test figures.

Decision rule, stated before the figures were read: every dataset counts equally; a rule's
score on a dataset is its validation Recall@20 averaged over the budgets and the dataset's
seeds; ``auto`` is the rule with the highest mean of those scores over the datasets, and a
rule within :data:`TIE` of the best counts as tied, the earlier one in the files' rule order
winning (the order ``precision_rules.py --rules`` was given: simpler storage first). The
worst regret (how far a rule is below the best rule of a dataset, at its worst dataset) is
printed beside it for the reader, not used.

Writes FILE.md and FILE.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

TIE = 5e-4


def load(dirs: list[Path]) -> dict[str, list[dict]]:
    """Validation documents by dataset, in the order found."""
    out: dict[str, list[dict]] = {}
    for folder in dirs:
        for path in sorted(folder.glob("precision_valid_seed*.json")):
            doc = json.loads(path.read_text())
            if doc.get("split") != "valid":
                raise SystemExit(f"{path}: not a validation file")
            out.setdefault(doc["dataset"], []).append(doc)
    if not out:
        raise SystemExit("no precision_valid_seed*.json files found")
    return out


def decide(by_dataset: dict[str, list[dict]]) -> dict:
    """Per dataset and rule the seed-mean Recall@20 per budget, the scores, and the choice."""
    rules = by_dataset[next(iter(by_dataset))][0]["rules"]
    table: dict[str, dict[str, dict[str, float]]] = {}
    score: dict[str, dict[str, float]] = {}
    for name, docs in by_dataset.items():
        budgets = docs[0]["budgets"]
        table[name], score[name] = {}, {}
        for rule in rules:
            per_budget = {b: float(np.mean([d["results"][rule][b]["recall@20"] for d in docs]))
                          for b in budgets}
            table[name][rule] = per_budget
            score[name][rule] = float(np.mean(list(per_budget.values())))
    overall = {r: float(np.mean([score[n][r] for n in score])) for r in rules}
    best = max(overall.values())
    auto = next(r for r in rules if overall[r] >= best - TIE)
    regret = {r: max(max(score[n].values()) - score[n][r] for n in score) for r in rules}
    seeds = {n: [d["seed"] for d in docs] for n, docs in by_dataset.items()}
    return {"rules": rules, "seeds": seeds, "recall@20": table, "score": score,
            "overall": overall, "worst_regret": regret, "tie": TIE, "auto": auto}


def markdown(result: dict) -> str:
    rules = result["rules"]
    lines = ["Validation Recall@20, mean over each dataset's seeds (`precision_rules.py` files); "
             "no test figures.", ""]
    for name, rows in result["recall@20"].items():
        budgets = list(next(iter(rows.values())))
        seeds = ", ".join(map(str, result["seeds"][name]))
        lines += [f"{name} (seeds {seeds})", "", "| rule | " + " | ".join(budgets) + " | mean |",
                  "|---" * (len(budgets) + 2) + "|"]
        for rule in rules:
            cells = " | ".join(f"{rows[rule][b]:.4f}" for b in budgets)
            lines.append(f"| {rule} | {cells} | {result['score'][name][rule]:.4f} |")
        lines.append("")
    names = list(result["score"])
    lines += ["| rule | " + " | ".join(names) + " | mean over datasets | worst regret |",
              "|---" * (len(names) + 3) + "|"]
    for rule in rules:
        cells = " | ".join(f"{result['score'][n][rule]:.4f}" for n in names)
        lines.append(f"| {rule} | {cells} | {result['overall'][rule]:.4f} | "
                     f"{result['worst_regret'][rule]:.4f} |")
    lines += ["", f"Decision (highest mean over datasets, ties within {result['tie']} to the "
              f"earlier rule): **auto = {result['auto']}**", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, required=True, help="FILE.md (FILE.json beside it)")
    args = ap.parse_args()
    result = decide(load(args.dirs))
    text = markdown(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
