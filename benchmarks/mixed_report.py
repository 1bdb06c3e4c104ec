"""The mixed-precision results table and its targets, from committed budget_compare files.

    python benchmarks/mixed_report.py DIR [--seed S]

Reads DIR/seed{S}.json and DIR/paired.json (written by ``budget_compare.py RUN --precisions
fp32,auto --baselines lightgcn,lightgcn-fp16,lightgcn-int8`` and ``--summarise --keep-labels
--against "PEEL (auto precision)"``) and DIR/precision_valid_seed{S}.json (the validation
choice of ``auto``, ``precision_rules.py``), and writes DIR/results.md: Recall@20 / NDCG@20 of
PEEL (fp32), PEEL (auto precision), LightGCN, LightGCN-fp16 and LightGCN-int8 at each budget,
the dimensions and bytes each used, and whether issue 20's targets hold:

* PEEL (auto) at the smallest budget >= PEEL (fp32) at the middle one (Recall@20);
* PEEL (auto) >= the better quantised LightGCN at every budget (Recall@20).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROWS = ("PEEL (fp32)", "PEEL (auto precision)", "LightGCN", "LightGCN-fp16", "LightGCN-int8")
AUTO, FP32 = "PEEL (auto precision)", "PEEL (fp32)"


def cell(row: dict) -> str:
    return f"{row['recall@20']:.4f} / {row['ndcg@20']:.4f}"


def size(method: str, row: dict) -> str:
    if method.startswith("PEEL"):
        return f"{row['bytes_used']:,} B"
    return f"{row['dim']}-d, {row['bytes_used']:,} B"


def report(folder: Path, seed: int) -> str:
    doc = json.loads((folder / f"seed{seed}.json").read_text())
    methods = doc["methods"]
    budgets = sorted((b for b in methods[AUTO] if b != "1.0"), key=float)
    valid_path = folder / f"precision_valid_seed{seed}.json"
    valid = json.loads(valid_path.read_text()) if valid_path.exists() else None
    paired_path = folder / "paired.json"
    paired = json.loads(paired_path.read_text()).get(str(seed), {}) if paired_path.exists() \
        else {}
    lines = [f"# Mixed-precision packages on {doc['dataset']} (seed {seed}, {doc['split']} "
             "split)", "",
             f"Run `{doc['run']}`. Recall@20 / NDCG@20; bytes are what a device holds (PEEL: "
             "the largest user-group package; LightGCN: item table + scales + one float32 "
             "user vector).", ""]
    if valid is not None:
        lines += [f"`auto` = **{valid['auto']}**, chosen on the validation split "
                  f"(`precision_valid_seed{seed}.md`: mean validation Recall@20 "
                  + ", ".join(f"{r} {v:.4f}" for r, v in valid["mean_recall@20"].items())
                  + ").", ""]
    lines += ["| method | " + " | ".join(budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for method in ROWS:
        rows = methods.get(method, {})
        lines.append(f"| {method} | " + " | ".join(
            f"{cell(rows[b])} ({size(method, rows[b])})" if b in rows else "" for b in budgets)
            + " |")
    if "1.0" in methods.get(AUTO, {}):
        lines += ["", f"Every block kept: PEEL (fp32) {cell(methods[FP32]['1.0'])}, "
                  f"PEEL (auto precision) {cell(methods[AUTO]['1.0'])}."]
    lines += ["", "Targets (Recall@20):", ""]
    auto, fp32 = methods[AUTO], methods[FP32]
    small, middle = budgets[0], budgets[1]
    met = auto[small]["recall@20"] >= fp32[middle]["recall@20"]
    lines.append(f"- PEEL (auto) at {small} ({auto[small]['recall@20']:.4f}) >= PEEL (fp32) at "
                 f"{middle} ({fp32[middle]['recall@20']:.4f}): **{'met' if met else 'not met'}**"
                 f" ({auto[small]['recall@20'] - fp32[middle]['recall@20']:+.4f})")
    for b in budgets:
        rivals = {m: methods[m][b]["recall@20"] for m in ("LightGCN-fp16", "LightGCN-int8")
                  if b in methods.get(m, {})}
        if not rivals:
            continue
        best = max(rivals, key=rivals.get)
        diff = auto[b]["recall@20"] - rivals[best]
        test = paired.get(best, {}).get(b)
        p = "" if not test or test["wilcoxon_p"] is None else \
            f", Wilcoxon p = {test['wilcoxon_p']:.2g} over {test['users']} users"
        lines.append(f"- PEEL (auto) at {b} ({auto[b]['recall@20']:.4f}) >= {best} "
                     f"({rivals[best]:.4f}): **{'met' if diff >= 0 else 'not met'}** "
                     f"({diff:+.4f}{p})")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--seed", type=int, default=None, help="default: the only seed file")
    args = ap.parse_args()
    seed = args.seed
    if seed is None:
        files = sorted(args.folder.glob("seed[0-9]*.json"))
        if len(files) != 1:
            ap.error(f"{args.folder}: give --seed (found {len(files)} seed files)")
        seed = json.loads(files[0].read_text())["seed"]
    text = report(args.folder, seed)
    (args.folder / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
