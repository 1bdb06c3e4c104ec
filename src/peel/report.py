"""Reports in the layout of the paper's Table III, from one or more evaluated runs.

`peel report RUN... --out DIR` merges every run's `eval.json` and writes `results.md` (Markdown
table: methods x budgets, Recall@50 / NDCG@50 like Table III, plus @20), `results.csv` and
`results.json` (every figure), and `recall50.png` / `ndcg50.png` (metric against budget for every
method). Plots are optional: without matplotlib the tables are still written.

Every figure a results README quotes comes from these files, so the report also writes what
the runs and their evaluations know beyond Table III: `stages.csv` (each run's seconds per
stage from `train_summary.json`, the precision rule its "auto" chose on validation, and its
stage-1 best epoch and validation Recall@20, and with `[pretrain] trials` the setting chosen),
`blocks.csv` (blocks each user group's package keeps for each item group at each budget),
`hyperparameters.csv` (each baseline's size and the setting chosen on validation, with every
trial, when `peel evaluate --tune-trials` tuned it), and the same as Markdown sections at the
end of `results.md` and as `details.json`. Rows of the reference budget "all" (`peel evaluate
--reference`: every block kept, the pretrained model) are a column of the table like any
budget. Rows carry their run's seed; with runs of several seeds each seed is its own row.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peel.errors import PeelError
from peel.io import check_output_dir, read_json, write_json, write_text
from peel.runfolder import check_complete, chosen_precision

METRICS = ("recall@20", "ndcg@20", "recall@50", "ndcg@50")
METHOD_ORDER = ("PMF", "BPR-MF", "LightGCN", "lightgcn-svd", "PEEL", "pretrained")


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
        seed = _run_seed(run)
        rows.extend({**r, "seed": seed} for r in checked)
    return rows


def _run_seed(run: str | Path) -> int | None:
    """The run's seed from its config.toml (None for a folder without one)."""
    from peel.pipeline import load_run_config
    from peel.runfolder import config_path

    if not config_path(run).exists():
        return None
    return load_run_config(run).run.seed


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


def _seeded(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of a dataset evaluated under several seeds get the seed in their method name."""
    out = []
    for r in rows:
        seeds = {x.get("seed") for x in rows if x["dataset"] == r["dataset"]
                 and x["method"] == r["method"]}
        out.append({**r, "method": f"{r['method']} [seed {r.get('seed')}]"}
                   if len(seeds) > 1 else r)
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    """One table per dataset; bold marks the best value of each column."""
    out = []
    rows = _seeded(rows)
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
    w.writerow(["dataset", "method", "budget", "budget_bytes", "bytes_used", *METRICS, "run",
                "seed"])
    for r in sorted(rows, key=lambda r: (r["dataset"], _method_key(r["method"]),
                                         r["budget_bytes"], str(r.get("seed")))):
        w.writerow([r["dataset"], r["method"], r["budget"], r["budget_bytes"], r["bytes_used"],
                    *[f"{r['metrics'].get(m, float('nan')):.6f}" for m in METRICS], r["run"],
                    r.get("seed")])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Beyond Table III: stage timings, blocks kept, chosen hyper-parameters
# ---------------------------------------------------------------------------------------------

STAGES = ("data", "pretrain", "groups", "finetune", "precision")


def stage_rows(runs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Each run's seconds per stage (train_summary.json) and stage 1's best epoch and
    validation Recall@20 (pretrain/pretrain_log.json); runs without them are skipped."""
    out = []
    for run in runs:
        path = Path(run) / "train_summary.json"
        if not path.exists():
            continue
        summary = read_json(path)
        seconds = summary.get("seconds") if isinstance(summary, dict) else None
        if not isinstance(seconds, dict):
            raise ReportError(f"{path}: no 'seconds' object; re-run `peel train` into {run}")
        row: dict[str, Any] = {"run": str(run), "seed": _run_seed(run),
                               **{f"{k}_s": seconds.get(k) for k in STAGES},
                               "pretrain_all_sessions_s":
                                   summary.get("pretrain_seconds_all_sessions")}
        row["precision_rule"] = chosen_precision(run)  # "auto" of this run (None: default)
        log = Path(run) / "pretrain" / "pretrain_log.json"
        if log.exists():
            doc = read_json(log)
            row["pretrain_best_epoch"] = doc.get("best_epoch")
            row["pretrain_epochs"] = len(doc.get("history") or [])
            row["pretrain_valid_recall@20"] = (doc.get("valid") or {}).get("recall@20")
        tuning = Path(run) / "pretrain" / "tuning.json"  # [pretrain] trials > 1
        row["pretrain_trials"], row["pretrain_chosen"] = 1, None
        if tuning.exists():
            doc = read_json(tuning)
            row["pretrain_trials"] = doc.get("trials")
            row["pretrain_chosen"] = json.dumps(doc.get("chosen"), sort_keys=True)
        out.append(row)
    return out


def block_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, budget, user group, item group): blocks its package keeps."""
    out = []
    for r in rows:
        kept = (r.get("detail") or {}).get("blocks_per_item_group")
        if not isinstance(kept, dict):
            continue
        for group, counts in sorted(kept.items(), key=lambda kv: int(kv[0])):
            for item_group, n in enumerate(counts):
                out.append({"dataset": r["dataset"], "method": r["method"],
                            "budget": r["budget"], "seed": r.get("seed"),
                            "user_group": int(group), "item_group": item_group, "blocks": n})
    return out


def block_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, budget): over user groups, how many item groups keep one block and how
    many blocks the most popular item group (0) and the least popular one keep."""
    out = []
    for r in rows:
        kept = (r.get("detail") or {}).get("blocks_per_item_group")
        if not isinstance(kept, dict) or not kept:
            continue
        counts = list(kept.values())
        ones = [sum(1 for n in c if n == 1) for c in counts]
        out.append({"dataset": r["dataset"], "method": r["method"], "budget": r["budget"],
                    "seed": r.get("seed"), "user_groups": len(counts),
                    "item_groups": len(counts[0]),
                    "one_block_min": min(ones), "one_block_max": max(ones),
                    "top_group_min": min(c[0] for c in counts),
                    "top_group_max": max(c[0] for c in counts),
                    "tail_group_min": min(c[-1] for c in counts),
                    "tail_group_max": max(c[-1] for c in counts)})
    return out


def hyperparameter_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each baseline row's size and setting: chosen on validation when tuned, else the
    configured one ("not tuned")."""
    out = []
    for r in rows:
        detail = r.get("detail") or {}
        if "dim" not in detail or r["budget"] == "all":
            continue
        tuning = detail.get("tuning") if isinstance(detail.get("tuning"), dict) else None
        row: dict[str, Any] = {"dataset": r["dataset"], "method": r["method"],
                               "budget": r["budget"], "seed": r.get("seed"),
                               "dim": detail["dim"], "best_epoch": detail.get("best_epoch")}
        if tuning is None:
            row.update(tuned="no", trials=0, chosen="")
        else:
            log = tuning.get("log") or []
            row.update(tuned="yes" if tuning.get("space") else "nothing to tune",
                       trials=tuning.get("trials"), chosen_trial=tuning.get("chosen_trial"),
                       chosen=json.dumps(tuning.get("chosen"), sort_keys=True),
                       **{"default_valid_recall@20": log[0].get("valid_recall@20")
                          if log else None,
                          "chosen_valid_recall@20": tuning.get("valid_recall@20")})
        out.append(row)
    return out


def _csv(records: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for r in records for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in records:
        w.writerow({k: _fmt(v) for k, v in r.items()})
    return buf.getvalue()


def _fmt(value: Any) -> Any:
    return f"{value:.6f}" if isinstance(value, float) else value


def _md_table(records: list[dict[str, Any]], columns: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(_cell(c, r.get(c)) for c in columns) + " |" for r in records]
    return lines


def _cell(column: str, value: Any) -> str:
    """Seconds to 0.1 s, other floats (metrics) to 4 places like Table III."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.1f}" if column.endswith("_s") else f"{value:.4f}"
    return str(value)


def details_markdown(stages: list[dict[str, Any]], blocks: list[dict[str, Any]],
                     hyper: list[dict[str, Any]]) -> str:
    out: list[str] = []
    if stages:
        out += ["### Stage timings (seconds, wall-clock on the machine that trained each run)",
                ""]
        out += _md_table(stages, ["run", "seed", *[f"{k}_s" for k in STAGES],
                                  "pretrain_all_sessions_s", "precision_rule",
                                  "pretrain_best_epoch",
                                  "pretrain_epochs", "pretrain_valid_recall@20",
                                  "pretrain_trials", "pretrain_chosen"])
        out.append("")
    if blocks:
        out += ["### Blocks kept per item group (over user groups: item groups keeping one "
                "block; blocks of the most and least popular item group)", ""]
        out += _md_table(blocks, ["dataset", "method", "budget", "seed", "user_groups",
                                  "item_groups", "one_block_min", "one_block_max",
                                  "top_group_min", "top_group_max", "tail_group_min",
                                  "tail_group_max"])
        out.append("")
    if hyper:
        out += ["### Baseline sizes and hyper-parameters (chosen on validation Recall@20)", ""]
        out += _md_table(hyper, ["dataset", "method", "budget", "seed", "dim", "best_epoch",
                                 "tuned", "trials", "chosen", "default_valid_recall@20",
                                 "chosen_valid_recall@20"])
        out.append("")
    return "\n".join(out)


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
    stages, blocks, hyper = stage_rows(runs), block_rows(rows), hyperparameter_rows(rows)
    summary = block_summary(rows)
    details = details_markdown(stages, summary, hyper)
    write_text(out / "results.md", markdown(rows) + "\n" + (details + "\n" if details else ""))
    write_text(out / "results.csv", to_csv(rows))
    write_json(out / "results.json", rows)
    write_text(out / "stages.csv", _csv(stages))
    write_text(out / "blocks.csv", _csv(blocks))
    write_text(out / "hyperparameters.csv", _csv(hyper))
    write_json(out / "details.json", {"stages": stages, "blocks_summary": summary,
                                      "hyperparameters": hyper})
    plots = [m for m in ("recall@50", "ndcg@50")
             if plot(_seeded(rows), m, out / f"{m.replace('@', '')}.png")]
    return {"rows": len(rows), "out": str(out), "plots": plots}
