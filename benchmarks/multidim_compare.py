"""ESAPN and AutoEmb at each budget on one trained run: test metrics, wall time, device latency.

    python benchmarks/multidim_compare.py RUN --out DIR [--budgets 0.107,0.213,0.533] \
        [--methods esapn,autoemb] [--epochs 10] [--tune-trials 0] \
        [--reference docs/results/ml-1m/issue14/seed0.json] \
        [--keep OLD/seed0.json --relabel "AutoEmb=AutoEmb (argmax)"]

Reporting only (test split). Every choice a fit makes (its early-stopping epoch, the sizes it
deploys) is made on the validation split; ``--tune-trials N`` adds :func:`peel.tuning.tune`'s
N validation trials per budget from each class's ``search_space`` (0: the run's ``[pretrain]``
setting only). ``--sampling`` picks the negatives (default uniform, see
:data:`DEFAULT_SAMPLING`). ``--epochs`` caps the training epochs (the run's config says 300 with
patience 5; the cap keeps one fit on ml-1m at a few minutes on this project's shared 2-core
box, and each row's ``best_epoch`` / ``epochs_run`` say whether it bound). Per row: Recall /
NDCG @20 and @50, the sizes chosen (histogram) and the bytes by part, ``seconds`` (fit +
test evaluation, wall clock; the search's own time is ``search_seconds``) and the latency of
what a phone does for one user: lift the stored item vectors, score them and take the top 20
with the user's seen items excluded (:mod:`peel.device_multidim`, numpy only), for
``--latency-users`` test users, against the same top 20 over the dense 128-d pretrained
table. Writes DIR/seed{S}.json, DIR/per_user_seed{S}.npz (per-user Recall@20 / NDCG@20,
aligned by user) and DIR/table.md, which also lists the fixed-size LightGCN and PEEL rows of
``--reference`` (a budget_compare seed file of the same run and seed) when given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from budget_compare import METRICS
from compress_compare import latency

DEFAULT_EPOCHS = 10
#: Uniform negatives, not the run's DNS: on ml-1m seed 0's validation split at 10.7% DNS
#: trained both methods worse after the first epochs and cost several times more per epoch
#: (docs/results/ml-1m/multidim/sampling_probe_valid.log).
DEFAULT_SAMPLING = "uniform"


def score(run: Path, budgets: list[str], methods: list[str], epochs: int, tune_trials: int,
          latency_users: int, sampling: str) -> tuple[dict, dict[str, np.ndarray]]:
    from peel.baselines import make_baseline
    from peel.budget import full_table_bytes, parse_budget
    from peel.eval import evaluate
    from peel.pipeline import load_run_config, run_data
    from peel.pretrain import load_embeddings
    from peel.tuning import tune

    cfg = load_run_config(run)
    pre = replace(cfg.pretrain, epochs=min(epochs, cfg.pretrain.epochs),
                  sampling=sampling or cfg.pretrain.sampling)
    data = run_data(run)
    full = full_table_bytes(data.n_items, pre.dim)
    seen = data.seen_matrix("test")
    rng = np.random.default_rng(0)
    test_users = np.flatnonzero(data.test.getnnz(axis=1) > 0)
    lat_users = np.sort(rng.choice(test_users, min(latency_users, len(test_users)),
                                   replace=False))
    doc: dict = {"run": str(run), "seed": cfg.run.seed, "split": "test", "dataset": data.name,
                 "epochs_cap": pre.epochs, "patience": pre.patience, "tune_trials": tune_trials,
                 "sampling": pre.sampling, "lr": pre.lr, "batch_size": pre.batch_size,
                 "methods": {}, "seconds": {}}
    per_user: dict[str, np.ndarray] = {}
    t_all = time.perf_counter()
    for name in methods:
        for b in budgets:
            t0 = time.perf_counter()
            if tune_trials:  # chosen on validation; the test split is read below, once
                model, _ = tune(name, data, parse_budget(b, full), pre, tune_trials,
                                seed=cfg.run.seed, run=run)
            else:
                model = make_baseline(name, pre, run).fit(data, parse_budget(b, full))
            res = evaluate(model.scorer(), data, "test")
            row = {**{k: float(res.metrics[k]) for k in METRICS}, **model.params,
                   "search_seconds": model.params.get("seconds"),
                   "bytes_used": model.bytes_used, "budget_bytes": parse_budget(b, full),
                   "seconds": time.perf_counter() - t0}
            row.update(latency(model.device_scores, model.user_emb, seen, lat_users))
            doc["methods"].setdefault(model.label, {})[b] = row
            order = np.argsort(res.users)
            for m in ("recall@20", "ndcg@20"):
                per_user[f"{model.label}|{b}|{m}"] = np.asarray(res.per_user[m])[order]
            per_user["users"] = res.users[order]
            print(f"{name} at {b}: R@20 {res.metrics['recall@20']:.4f} "
                  f"({row['seconds']:.0f} s, {row['latency_ms_median']:.2f} ms)", flush=True)
    doc["seconds"]["total"] = time.perf_counter() - t_all
    u_emb, i_emb = load_embeddings(run / "pretrain")
    doc["dense_latency"] = latency(lambda v: i_emb @ v, u_emb, seen, lat_users)
    return doc, per_user


def sizes_text(hist: dict[str, int]) -> str:
    return " ".join(f"{s}:{c}" for s, c in hist.items() if c)


def table(doc: dict, reference: dict | None) -> str:
    rows = doc["methods"]
    budgets = sorted({b for r in rows.values() for b in r}, key=float)
    lines = [f"{doc['dataset']} seed {doc['seed']}, {doc['split']} split, Recall@20 / NDCG@20 "
             f"(epochs capped at {doc['epochs_cap']}, patience {doc['patience']}, "
             f"{doc['sampling']} negatives, "
             f"{doc['tune_trials']} tuning trials); in brackets: mean item size, bytes used, "
             "wall s (fit + test evaluation; upper bound, shared machine), one user's device "
             "latency (lift + score + top-20, median ms)", "",
             "| method | " + " | ".join(budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for label, by_budget in rows.items():
        cells = []
        for b in budgets:
            r = by_budget.get(b)
            cells.append("" if r is None else (
                f"{r['recall@20']:.4f} / {r['ndcg@20']:.4f} ({r['mean_item_size']:.1f}-d mean; "
                f"{r['bytes_used']:,} B; {r['seconds']:.0f} s; "
                f"{r['latency_ms_median']:.2f} ms)"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if reference:
        for label in ("PEEL", "PEEL (int8)", "LightGCN"):  # "PEEL (int8)": the default package
            ref = reference["methods"].get(label)
            if ref:
                lines.append(f"| {label} (same run, {Path(doc['reference']).name}) | " + " | ".join(
                    f"{ref[b]['recall@20']:.4f} / {ref[b]['ndcg@20']:.4f}"
                    + (f" ({ref[b]['dim']}-d)" if "dim" in ref[b] else "")
                    if b in ref else "" for b in budgets) + " |")
    lines += ["", "Item sizes deployed (size:count), epochs (best / run), AutoEmb's demotions:",
              ""]
    for label, by_budget in rows.items():
        for b in budgets:
            r = by_budget.get(b)
            if r:
                extra = (f"; {r['demoted_items']} items demoted from the argmax "
                         f"({sizes_text(r['argmax_item_sizes'])})" if "demoted_items" in r
                         else f"; {r['growth_refused_by_budget']:,} growth requests refused")
                if "retrain_valid_recall@20" in r:
                    extra += (f"; validation Recall@20 of the searched sizes as searched "
                              f"{r['search_valid_recall@20']:.4f}, retrained "
                              f"{r['retrain_valid_recall@20']:.4f} (deployed: "
                              f"{r['deployed_from']}, search epoch {r['search_best_epoch']}, "
                              f"retrain epoch {r['retrain_best_epoch']})")
                if "soft_valid_recall@20" in r:
                    extra += (f"; validation Recall@20 deployed {r['valid_recall@20']:.4f}, "
                              f"soft mix (not deployable) {r['soft_valid_recall@20']:.4f}")
                lines.append(f"- {label} at {b}: {sizes_text(r['item_sizes'])}; epochs "
                             f"{r['best_epoch']} / {r['epochs_run']}{extra}")
    lines += ["", f"Dense 128-d pretrained table, one user's top-20: "
              f"{doc['dense_latency']['latency_ms_median']:.2f} ms median."]
    return "\n".join(lines) + "\n"


def keep_rows(doc: dict, old: dict, source: Path, relabel: list[str]) -> None:
    """Add ``old``'s rows (relabelled) that ``doc`` did not score, each marked with the file
    it came from; refuse a file of another run, seed or split."""
    for key in ("run", "seed", "split"):
        if old.get(key) != doc[key]:
            raise SystemExit(f"--keep {source}: {key} {old.get(key)!r}, this run's is "
                             f"{doc[key]!r}")
    names = dict(item.split("=", 1) for item in relabel)
    for label, rows in old["methods"].items():
        new = names.get(label, label)
        if new not in doc["methods"]:
            doc["methods"][new] = {b: {**r, "kept_from": str(source)} for b, r in rows.items()}
    doc["seconds"].update({f"kept: {k}": v for k, v in old.get("seconds", {}).items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budgets", default="0.107,0.213,0.533")
    ap.add_argument("--methods", default="esapn,autoemb")
    ap.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                    help="cap on training epochs (early stopping on validation still applies)")
    ap.add_argument("--tune-trials", type=int, default=0)
    ap.add_argument("--sampling", default=DEFAULT_SAMPLING, choices=("uniform", "dns", ""),
                    help="negatives ('' = the run's [pretrain] sampling)")
    ap.add_argument("--latency-users", type=int, default=300)
    ap.add_argument("--reference", type=Path,
                    help="a budget_compare seed file of the same run (PEEL and LightGCN rows)")
    ap.add_argument("--keep", type=Path, metavar="SEED_FILE",
                    help="an earlier seed file of this script (same run, seed and split): its "
                         "rows join this one's, after --relabel, unless scored again here")
    ap.add_argument("--relabel", action="append", default=[], metavar="OLD=NEW",
                    help="rename a row of --keep (e.g. a method whose default changed since)")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    doc, per_user = score(args.run, args.budgets.split(","), methods, args.epochs,
                          args.tune_trials, args.latency_users, args.sampling)
    if args.keep:
        keep_rows(doc, json.loads(args.keep.read_text()), args.keep, args.relabel)
    reference = None
    if args.reference:
        reference = json.loads(args.reference.read_text())
        if reference.get("seed") != doc["seed"]:
            raise SystemExit(f"--reference is seed {reference.get('seed')}, the run is "
                             f"seed {doc['seed']}")
        doc["reference"] = str(args.reference)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"seed{doc['seed']}.json").write_text(json.dumps(doc, indent=2) + "\n")
    np.savez(args.out / f"per_user_seed{doc['seed']}.npz", **per_user)
    md = table(doc, reference)
    (args.out / "table.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
