"""Merge budget_compare.py outputs of one seed that were produced in several pieces.

    python benchmarks/combine_seed_files.py --out DIR PART_DIR [PART_DIR ...]

A long comparison (e.g. LightGCN retrained at each budget on gowalla) is easier to schedule one
budget at a time: ``budget_compare.py RUN --out PART --budgets 0.213 --baselines lightgcn``.
This joins every PART's ``seed{S}.json`` and ``per_user_seed{S}.npz`` into DIR, seed by seed.
Rows present in several parts (PEEL and the pretrained model are scored in each) must agree
to 1e-9, and per-user arrays must cover the same users, otherwise it refuses: the parts would
not come from the same run. Then ``budget_compare.py --summarise DIR`` computes means and
paired tests as usual.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _merge_rows(into: dict, doc: dict, where: Path) -> None:
    for method, rows in doc["methods"].items():
        for budget, row in rows.items():
            old = into.setdefault(method, {}).get(budget)
            if old is not None and abs(old["recall@20"] - row["recall@20"]) > 1e-9:
                raise SystemExit(f"{where}: {method} at {budget} differs from another part "
                                 f"({row['recall@20']} vs {old['recall@20']})")
            into[method][budget] = row


def combine(parts: list[Path], out: Path) -> list[int]:
    """Write one seed file and one per-user file per seed found in ``parts``."""
    docs: dict[int, dict] = {}
    arrays: dict[int, dict[str, np.ndarray]] = {}
    for part in parts:
        for path in sorted(part.glob("seed[0-9]*.json")):
            doc = json.loads(path.read_text())
            seed = int(doc["seed"])
            merged = docs.setdefault(seed, {**doc, "methods": {}, "seconds": {}, "parts": []})
            _merge_rows(merged["methods"], doc, path)
            merged["seconds"].update({f"{part.name}:{k}": v for k, v in doc["seconds"].items()})
            merged["parts"].append(str(part))
            with np.load(part / f"per_user_seed{seed}.npz", allow_pickle=False) as pu:
                have = arrays.setdefault(seed, {})
                if "users" in have and not np.array_equal(have["users"], pu["users"]):
                    raise SystemExit(f"{part}: per-user results cover other users")
                have.update({k: pu[k] for k in pu.files})
    out.mkdir(parents=True, exist_ok=True)
    for seed, doc in docs.items():
        (out / f"seed{seed}.json").write_text(json.dumps(doc, indent=2) + "\n")
        np.savez(out / f"per_user_seed{seed}.npz", **arrays[seed])
    return sorted(docs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    print("seeds", combine(args.parts, args.out), "->", args.out)


if __name__ == "__main__":
    main()
