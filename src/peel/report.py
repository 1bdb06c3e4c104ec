"""Reports in the layout of the paper's Table III, from one or more evaluated runs.

`peel report RUN... --out DIR` merges every run's `eval.json` and writes `results.md` (Markdown
table: methods x budgets, Recall@50 / NDCG@50 like Table III, plus @20), `results.csv` and
`results.json` (every figure), and `recall50.png` / `ndcg50.png` (metric against budget for every
method). Plots are optional: without matplotlib the tables are still written.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peel.errors import PeelError
from peel.io import check_output_dir, read_json, write_json, write_text
from peel.runfolder import check_complete

METRICS = ("recall@20", "ndcg@20", "recall@50", "ndcg@50")
METHOD_ORDER = ("PMF", "LightGCN", "lightgcn-svd", "PEEL")


class ReportError(PeelError):
    """An ``eval.json`` that is not what ``peel evaluate`` writes; names the file and field."""


def collect(runs: Sequence[str | Path], partial: bool = False) -> list[dict[str, Any]]:
    """Every run's eval.json rows; incomplete runs and partial rows are refused unless
    ``partial`` (a table would otherwise compare figures over different sets of users)."""
    rows: list[dict[str, Any]] = []
    for run in runs:
        check_complete(run, partial)
        path = Path(run) / "eval.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: run not evaluated yet; evaluate it first "
                                    f"(peel evaluate {run})")
        checked = read_eval(path, str(run))
        flagged = [r["method"] for r in checked
                   if isinstance(r.get("detail"), dict) and r["detail"].get("partial")]
        if flagged and not partial:
            raise ValueError(f"{path}: rows of {', '.join(sorted(set(flagged)))} were evaluated "
                             "on an incomplete run (partial); re-evaluate the finished run, or "
                             "pass partial=True (--partial)")
        rows.extend(checked)
    return rows


def read_eval(path: Path, run: str) -> list[dict[str, Any]]:
    """The rows of one ``eval.json``, each checked so that writing the report cannot fail."""
    doc = read_json(path)
    fix = f"re-run `peel evaluate {run}` to rewrite it"
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise ReportError(f"{path}: not an eval.json written by peel evaluate (no 'rows' list);"
                          f" {fix}")
    dataset, full = doc.get("dataset"), doc.get("full_table_bytes")
    if not isinstance(dataset, str) or not _is_int(full) or full <= 0:
        raise ReportError(f"{path}: 'dataset' must be a string and 'full_table_bytes' a "
                          f"positive integer; {fix}")
    return [{**_check_row(row, path, i, fix), "dataset": dataset, "run": run,
             "full_table_bytes": full} for i, row in enumerate(doc["rows"])]


def _check_row(row: Any, path: Path, i: int, fix: str) -> dict[str, Any]:
    where = f"{path}: rows[{i}]"
    if not isinstance(row, dict):
        raise ReportError(f"{where} is not an object; {fix}")
    for key, ok in (("method", isinstance(row.get("method"), str)),
                    ("budget", isinstance(row.get("budget"), str)),
                    ("budget_bytes", _is_int(row.get("budget_bytes"))),
                    ("bytes_used", _is_int(row.get("bytes_used"))),
                    ("metrics", isinstance(row.get("metrics"), dict))):
        if not ok:
            raise ReportError(f"{where}: missing or wrong type of '{key}'; {fix}")
    for name, value in row["metrics"].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ReportError(f"{where}: metric {str(name)[:40]!r} = {str(value)[:40]!r} is not "
                              f"a number; {fix}")
    return row


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _method_key(name: str) -> tuple[int, str]:
    base = name.split(" ")[0]
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), name)


def _budgets(rows: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return sorted({(r["budget_bytes"], r["budget"]) for r in rows})


def _budget_label(nbytes: int, label: str, full: int) -> str:
    return f"{label} ({nbytes / 1e6:.2f} MB, {100 * nbytes / full:.1f}%)"


def markdown(rows: list[dict[str, Any]]) -> str:
    """One table per dataset; bold marks the best value of each column."""
    out = []
    for dataset in sorted({r["dataset"] for r in rows}):
        sub = [r for r in rows if r["dataset"] == dataset]
        budgets = _budgets(sub)
        full = sub[0]["full_table_bytes"]
        methods = sorted({r["method"] for r in sub}, key=_method_key)
        cell = {(r["method"], r["budget_bytes"]): r["metrics"] for r in sub}
        out.append(f"### {dataset}\n")
        head = "| method | " + " | ".join(
            f"{_budget_label(b, lab, full)} R@50 | N@50 | R@20 | N@20" for b, lab in budgets)
        out.append(head + " |")
        out.append("|---" * (1 + 4 * len(budgets)) + "|")
        best = {(b, m): max((cell.get((meth, b), {}).get(m, float("-inf"))
                             for meth in methods), default=0.0)
                for b, _ in budgets for m in METRICS}
        for meth in methods:
            vals = []
            for b, _ in budgets:
                metrics = cell.get((meth, b))
                for m in ("recall@50", "ndcg@50", "recall@20", "ndcg@20"):
                    if metrics is None or m not in metrics:
                        vals.append("-")
                        continue
                    text = f"{metrics[m]:.4f}"
                    vals.append(f"**{text}**" if metrics[m] == best[(b, m)] else text)
            out.append(f"| {meth} | " + " | ".join(vals) + " |")
        out.append("")
    return "\n".join(out)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["dataset", "method", "budget", "budget_bytes", "bytes_used", *METRICS, "run"])
    for r in sorted(rows, key=lambda r: (r["dataset"], _method_key(r["method"]),
                                         r["budget_bytes"])):
        w.writerow([r["dataset"], r["method"], r["budget"], r["budget_bytes"], r["bytes_used"],
                    *[f"{r['metrics'].get(m, float('nan')):.6f}" for m in METRICS], r["run"]])
    return buf.getvalue()


def plot(rows: list[dict[str, Any]], metric: str, path: Path) -> bool:
    """Metric against budget (MB) for every method and dataset; False if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        sub = [r for r in rows if r["dataset"] == dataset]
        for meth in sorted({r["method"] for r in sub}, key=_method_key):
            pts = sorted((r["budget_bytes"] / 1e6, r["metrics"][metric])
                         for r in sub if r["method"] == meth and metric in r["metrics"])
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", label=meth)
        ax.set_title(dataset)
        ax.set_xlabel("memory budget (MB)")
        ax.set_ylabel(metric.replace("@", "@"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    from peel.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return True


def write_report(runs: Sequence[str | Path], out: str | Path,
                 partial: bool = False) -> dict[str, Any]:
    out = check_output_dir(out)  # before reading: a bad --out is reported first, not last
    rows = collect(runs, partial)
    write_text(out / "results.md", markdown(rows) + "\n")
    write_text(out / "results.csv", to_csv(rows))
    write_json(out / "results.json", rows)
    plots = [m for m in ("recall@50", "ndcg@50")
             if plot(rows, m, out / f"{m.replace('@', '')}.png")]
    return {"rows": len(rows), "out": str(out), "plots": plots}
