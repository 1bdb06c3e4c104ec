"""DLRM-CE and LightRec at each budget on one trained run: test metrics, wall time, device latency.

    python benchmarks/compress_compare.py RUN --out DIR [--budgets 0.107,0.213,0.533] \
        [--methods dlrm-ce,lightrec] [--lightgcn docs/results/ml-1m/issue14/seed0.json]

Reporting only (test split), after the settings were chosen on validation
(``benchmarks/compress_tune.py``). Scores through ``budget_compare.score_run`` (so PEEL's
and the pretrained model's rows of the same run and seed come along, per user), then times
what a phone does for one user: the numpy device scoring of
:mod:`peel.device_compressed` plus the top-20 with the user's seen items excluded, for
``--latency-users`` test users, against the same top-20 over the dense 128-d pretrained
table. Writes DIR/seed{S}.json, DIR/per_user_seed{S}.npz, the paired tests of
``budget_compare.py --summarise`` (DIR/seeds.json, paired.json, summary.md) and DIR/table.md,
which also lists the fixed-size LightGCN of ``--lightgcn`` (a budget_compare seed file of the
same run) for the paper's claim that both trail LightGCN.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from budget_compare import score_run, summarise


def latency(score: Any, vectors: np.ndarray, seen: Any, users: np.ndarray) -> dict[str, float]:
    """Median / p90 milliseconds to score every item and take the top 20 for one user."""
    from peel import device_compressed as dc

    times = []
    for u in users:
        ex = seen[u].indices
        ptr = np.array([0, len(ex)])
        t0 = time.perf_counter()
        dc.top_k(score(vectors[u]), 20, ptr, ex)
        times.append(time.perf_counter() - t0)
    ms = 1000 * np.array(times)
    return {"latency_ms_median": float(np.median(ms)),
            "latency_ms_p90": float(np.percentile(ms, 90)), "latency_users": len(users)}


def table(doc: dict, lightgcn: dict | None, methods: list[str]) -> str:
    rows = doc["methods"]
    budgets = sorted(next(iter(rows[m] for m in methods if m in rows)), key=float)
    lines = [f"{doc.get('dataset', 'dataset')} seed {doc['seed']}, {doc['split']} split, "
             "Recall@20 / NDCG@20; "
             "wall s = fit + evaluate (upper bound, shared machine); latency = one user's "
             "numpy scoring + top-20 (median ms)", "",
             "| method | " + " | ".join(budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    ref = doc["methods"]["pretrained"]["1.0"]

    def cell(r: dict, what: str) -> str:
        s = f"{r['recall@20']:.4f} / {r['ndcg@20']:.4f}"
        return s + (f" ({what}; {r['bytes_used']:,} B; {r['seconds']:.0f} s; "
                    f"{r['latency_ms_median']:.2f} ms)" if what else "")

    for label, key in (("DLRM-CE", "m"), ("LightRec", "codebooks")):
        if label in rows:
            lines.append(f"| {label} | " + " | ".join(
                cell(rows[label][b], f"{key}={rows[label][b][key]}") for b in budgets) + " |")
    peel = next((m for m in rows if m not in ("pretrained", "DLRM-CE", "LightRec")), None)
    if peel:
        lines.append(f"| {peel} (same run) | " + " | ".join(
            cell(rows[peel][b], "") for b in budgets) + " |")
    if lightgcn and "LightGCN" in lightgcn["methods"]:
        lg = lightgcn["methods"]["LightGCN"]
        lines.append("| LightGCN (fixed size, same run's seed file) | " + " | ".join(
            f"{lg[b]['recall@20']:.4f} / {lg[b]['ndcg@20']:.4f}"
            + (f" ({lg[b]['dim']}-d)" if lg[b].get("dim") else "")
            if b in lg else "" for b in budgets) + " |")
    lines += ["", f"Pretrained 128-d model: {ref['recall@20']:.4f} / {ref['ndcg@20']:.4f}; "
              f"its dense single-user ranking: {doc['dense_latency']['latency_ms_median']:.2f}"
              " ms median."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budgets", default="0.107,0.213,0.533")
    ap.add_argument("--methods", default="dlrm-ce,lightrec")
    ap.add_argument("--latency-users", type=int, default=300)
    ap.add_argument("--lightgcn", type=Path, help="a budget_compare seed file with LightGCN")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="METHOD:KEY=VALUE",
                    help="stage-1 config change for one method, e.g. lightrec:lr=0.001")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="DIR",
                    help="instead of scoring: merge the seed files of these folders (one run, "
                         "methods scored in parallel processes) into --out")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, args.out, args.lightgcn)
        return

    from peel.pipeline import run_data
    from peel.pretrain import load_embeddings

    data = run_data(args.run)
    seen = data.seen_matrix("test")
    rng = np.random.default_rng(0)
    users = np.flatnonzero(data.test.getnnz(axis=1) > 0)
    users = np.sort(rng.choice(users, min(args.latency_users, len(users)), replace=False))

    def on_fit(name: str, budget: str, model: Any) -> dict:
        return latency(model.device_scores, model.user_emb, seen, users)

    methods = [m for m in args.methods.split(",") if m]
    t0 = time.perf_counter()
    overrides: dict[str, list[str]] = {}
    for item in args.overrides:
        method, sep, pair = item.partition(":")
        if not sep:
            ap.error(f"--set {item!r}: expected METHOD:KEY=VALUE")
        overrides.setdefault(method, []).append(pair)
    doc, per_user = score_run(args.run, "test", args.budgets.split(","), methods, on_fit=on_fit,
                              overrides=overrides)
    doc["seconds"]["total"] = time.perf_counter() - t0
    u_emb, i_emb = load_embeddings(args.run / "pretrain")
    doc["dense_latency"] = latency(lambda v: i_emb @ v, u_emb, seen, users)
    write(doc, per_user, args.out, args.lightgcn)


def write(doc: dict, per_user: dict[str, np.ndarray], out: Path, lightgcn: Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"seed{doc['seed']}.json").write_text(json.dumps(doc, indent=2) + "\n")
    np.savez(out / f"per_user_seed{doc['seed']}.npz", **per_user)
    summarise(out, "PEEL")
    ref = json.loads(lightgcn.read_text()) if lightgcn else None
    md = table(doc, ref, ["DLRM-CE", "LightRec"])
    (out / "table.md").write_text(md)
    print(md)


def merge(folders: list[Path], out: Path, lightgcn: Path | None) -> None:
    """One seed file from several of the same run and seed (PEEL / pretrained rows agree); a
    method's budgets may come from different folders."""
    docs = [json.loads(next(f.glob("seed[0-9]*.json")).read_text()) for f in folders]
    if len({(d["run"], d["seed"], d["split"]) for d in docs}) != 1:
        raise SystemExit("--merge: the folders hold different runs, seeds or splits")
    doc = docs[0]
    seconds: dict[str, float] = {}
    per_user: dict[str, np.ndarray] = {}
    for folder, d in zip(folders, docs, strict=True):
        for method, rows in d["methods"].items():  # budgets scored in different folders join
            doc["methods"].setdefault(method, {}).update(rows)
        seconds.update({f"{folder.name}:{k}": v for k, v in d["seconds"].items()})
        with np.load(folder / f"per_user_seed{d['seed']}.npz", allow_pickle=False) as pu:
            per_user.update({k: pu[k] for k in pu.files})
    doc["seconds"] = seconds
    write(doc, per_user, out, lightgcn)


if __name__ == "__main__":
    main()
