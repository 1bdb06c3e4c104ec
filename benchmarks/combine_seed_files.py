"""Merge budget_compare.py outputs of one seed that were produced in several pieces.

    python benchmarks/combine_seed_files.py --out DIR PART_DIR [PART_DIR ...] \
        [--relabel PART_DIR:OLD=NEW ...]

A long comparison (e.g. LightGCN retrained at each budget on gowalla) is easier to schedule one
budget at a time: ``budget_compare.py RUN --out PART --budgets 0.213 --baselines lightgcn``.
This joins every PART's ``seed{S}.json`` and ``per_user_seed{S}.npz`` into DIR, seed by seed.
Rows present in several parts (PEEL and the pretrained model are scored in each) must agree
to 1e-9, and per-user arrays must cover the same users, otherwise it refuses: the parts would
not come from the same run. ``--relabel`` renames a method in one part before joining, e.g. the
rows a part scored before packages had a precision rule: ``--relabel OLD:PEEL="PEEL (fp32)"``.
Then ``budget_compare.py --summarise DIR`` computes means and
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


def parse_relabel(items: list[str]) -> dict[Path, dict[str, str]]:
    """``["DIR:OLD=NEW", ...]`` -> {DIR: {OLD: NEW}}."""
    out: dict[Path, dict[str, str]] = {}
    for item in items:
        part, sep, pair = item.rpartition(":")
        old, eq, new = pair.partition("=")
        if not sep or not eq or not old or not new:
            raise SystemExit(f"--relabel {item!r}: expected PART_DIR:OLD=NEW")
        out.setdefault(Path(part), {})[old] = new
    return out


def _relabel(doc: dict, arrays: dict[str, np.ndarray], names: dict[str, str]
             ) -> tuple[dict, dict[str, np.ndarray]]:
    """The part's rows and per-user keys (``METHOD|BUDGET|METRIC``) under the new names."""
    methods = {names.get(m, m): rows for m, rows in doc["methods"].items()}
    renamed = {}
    for key, value in arrays.items():
        method, sep, rest = key.partition("|")
        renamed[f"{names.get(method, method)}{sep}{rest}" if sep else key] = value
    return {**doc, "methods": methods}, renamed


def combine(parts: list[Path], out: Path,
            relabel: dict[Path, dict[str, str]] | None = None) -> list[int]:
    """Write one seed file and one per-user file per seed found in ``parts``."""
    docs: dict[int, dict] = {}
    arrays: dict[int, dict[str, np.ndarray]] = {}
    for part in parts:
        for path in sorted(part.glob("seed[0-9]*.json")):
            doc = json.loads(path.read_text())
            seed = int(doc["seed"])
            with np.load(part / f"per_user_seed{seed}.npz", allow_pickle=False) as pu:
                part_arrays = {k: pu[k] for k in pu.files}
            doc, part_arrays = _relabel(doc, part_arrays, (relabel or {}).get(part, {}))
            merged = docs.setdefault(seed, {**doc, "methods": {}, "seconds": {}, "parts": []})
            _merge_rows(merged["methods"], doc, path)
            merged["seconds"].update({f"{part.name}:{k}": v for k, v in doc["seconds"].items()})
            merged["parts"].append(str(part))
            have = arrays.setdefault(seed, {})
            if "users" in have and not np.array_equal(have["users"], part_arrays["users"]):
                raise SystemExit(f"{part}: per-user results cover other users")
            have.update(part_arrays)
    out.mkdir(parents=True, exist_ok=True)
    for seed, doc in docs.items():
        (out / f"seed{seed}.json").write_text(json.dumps(doc, indent=2) + "\n")
        np.savez(out / f"per_user_seed{seed}.npz", **arrays[seed])
    return sorted(docs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--relabel", action="append", default=[], metavar="PART_DIR:OLD=NEW",
                    help="rename method OLD of one part to NEW before joining")
    args = ap.parse_args()
    relabel = parse_relabel(args.relabel)
    unknown = set(relabel) - set(args.parts)
    if unknown:
        raise SystemExit(f"--relabel names parts not given: {', '.join(map(str, unknown))}")
    print("seeds", combine(args.parts, args.out, relabel), "->", args.out)


if __name__ == "__main__":
    main()
