"""Which precision rule becomes ``precision="auto"``: validation metrics of every rule.

    python benchmarks/precision_rules.py RUN --out DIR [--budgets 0.107,0.213,0.533]
                                         [--rules fp32,fp16,int8,int8o,value]

For each precision rule (:data:`peel.budget.PRECISIONS`) every user group of RUN is packaged
by the real package writer at each budget and ranked by the device runtime with ``peel
evaluate``'s own code, on the VALIDATION split (this script cannot score the test split: it
is used to choose). It also records, per rule and budget, how many blocks the packages keep
and at which kinds, and the measured quantisation error of every kind (the relative change
of each (item group, block) pair's score contribution for its users, as the "value" rule
measures it).

Decision rule, fixed before the numbers were seen: ``auto`` is the rule with the highest
validation Recall@20 averaged over the budgets; a rule within 0.0005 of the best counts as
tied and the earlier one in ``--rules`` order wins (simpler storage first).

Writes DIR/precision_valid_seed{S}.json and DIR/precision_valid_seed{S}.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from peel import runfolder
from peel.autoprecision import TIE, decide
from peel.budget import BLOCK_KINDS, PRECISIONS, full_table_bytes, parse_budget
from peel.device import open_package
from peel.package import build_package, quantisation_errors
from peel.pipeline import deploy_options, evaluate_peel, load_run_config, run_data, with_overrides

METRICS = ("recall@20", "ndcg@20", "recall@50", "ndcg@50")


def kept_blocks(run: Path, cfg: object, budgets: list[str], full: int, rule: str,
                tmp: Path) -> dict[str, dict[str, float]]:
    """Mean blocks kept per user group and the share of each kind, per budget."""
    options = with_overrides(deploy_options(cfg, run), precision=rule)  # type: ignore[arg-type]
    sized = sorted(((parse_budget(b, full), b) for b in budgets), reverse=True)
    kept: dict[str, list[int]] = {b: [] for b in budgets}
    kinds: dict[str, np.ndarray] = {b: np.zeros(len(BLOCK_KINDS)) for b in budgets}
    for g, _ in runfolder.group_files(run):
        arrays = runfolder.load_group(run, g)
        build_package(tmp / "p.peel", arrays, sized[0][0], group=g, options=options)
        big = open_package(tmp / "p.peel")
        for nbytes, label in sized:
            pkg = big.shrink(nbytes) if nbytes < sized[0][0] else big
            kept[label].append(pkg.n_selected)
            kinds[label] += np.bincount(pkg.kinds.astype(np.int64), minlength=len(BLOCK_KINDS))
    return {b: {"blocks_kept_mean": float(np.mean(kept[b])),
                "kind_share": {k: float(v) for k, v in
                               zip(BLOCK_KINDS, kinds[b] / kinds[b].sum(), strict=True)}}
            for b in budgets}


def error_summary(run: Path, similarity: str) -> dict[str, dict[str, float]]:
    """Quantisation error of each kind over all (user group, item group, block) pairs."""
    errors = np.concatenate([quantisation_errors(runfolder.load_group(run, g), similarity)
                             .reshape(-1, len(BLOCK_KINDS))
                             for g, _ in runfolder.group_files(run)])
    return {kind: {"median": float(np.median(errors[:, i])),
                   "p90": float(np.percentile(errors[:, i], 90)),
                   "max": float(errors[:, i].max())}
            for i, kind in enumerate(BLOCK_KINDS)}


def markdown(doc: dict) -> str:
    budgets = doc["budgets"]
    lines = [f"Validation split, {doc['dataset']}, seed {doc['seed']} (run {doc['run']}); "
             "Recall@20 / NDCG@20 per budget, mean blocks kept per user group "
             "(of {candidates}) and kinds".format(candidates=doc["candidates"]), "",
             "| rule | " + " | ".join(budgets) + " | mean R@20 |",
             "|---" * (len(budgets) + 2) + "|"]
    for rule, rows in doc["results"].items():
        cells = []
        for b in budgets:
            r = rows[b]
            share = ", ".join(f"{k} {v:.0%}" for k, v in r["kind_share"].items() if v > 0)
            cells.append(f"{r['recall@20']:.4f} / {r['ndcg@20']:.4f}, "
                         f"{r['blocks_kept_mean']:.1f} blocks ({share})")
        lines.append(f"| {rule} | " + " | ".join(cells)
                     + f" | {doc['mean_recall@20'][rule]:.4f} |")
    lines += ["", f"Decision (highest mean validation Recall@20, ties within {TIE} to the "
              f"earlier rule): **auto = {doc['auto']}**", "",
              "Quantisation error of each kind (relative change of a pair's score contribution "
              "for its group's users), over every (user group, item group, block) pair:", "",
              "| kind | median | p90 | max |", "|---|---|---|---|"]
    for kind, e in doc["errors"].items():
        lines.append(f"| {kind} | {e['median']:.2e} | {e['p90']:.2e} | {e['max']:.2e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run folder written by peel train")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budgets", default="0.107,0.213,0.533")
    ap.add_argument("--rules", default=",".join(PRECISIONS))
    args = ap.parse_args()
    cfg = load_run_config(args.run)
    data = run_data(args.run, cfg)
    budgets = sorted(args.budgets.split(","), key=float)
    rules = [r for r in args.rules.split(",") if r]
    full = full_table_bytes(data.n_items, cfg.pretrain.dim)
    results: dict[str, dict[str, dict]] = {}
    seconds = {}
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="peel-rules-")
    for rule in rules:
        t0 = time.perf_counter()
        rows = evaluate_peel(args.run, data, cfg, budgets, "valid", precision=rule)
        blocks = kept_blocks(args.run, cfg, budgets, full, rule, Path(tmp.name))
        results[rule] = {r.budget: {**{k: r.metrics[k] for k in METRICS},
                                    "bytes_used": r.bytes_used, "budget_bytes": r.budget_bytes,
                                    **blocks[r.budget]} for r in rows}
        seconds[rule] = time.perf_counter() - t0
        print(rule, {b: round(results[rule][b]["recall@20"], 4) for b in budgets}, flush=True)
    tmp.cleanup()
    auto, means = decide(results, rules)  # the rule a run's own choice uses, too
    n_blocks = cfg.finetune.n_blocks * cfg.groups.n_item_groups
    doc = {"run": str(args.run), "dataset": data.name, "seed": cfg.run.seed, "split": "valid",
           "budgets": budgets, "rules": rules, "candidates": n_blocks, "results": results,
           "mean_recall@20": means, "auto": auto, "tie": TIE, "seconds": seconds,
           "errors": error_summary(args.run, deploy_options(cfg).similarity or "aligned")}
    stem = f"precision_valid_seed{cfg.run.seed}"
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
