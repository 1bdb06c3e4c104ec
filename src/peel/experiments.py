"""The paper's experiments beyond Table III as one-command reports (``peel experiment ...``).

* :func:`dynamic` (RQ2, Fig. 3): a device starts at one budget and its budget changes along a
  sequence; for each method, the *measured* wall-clock of what it must do to obtain the new
  table after each change (PEEL: an on-device shrink, or a server round trip when the budget
  grows; fixed-size baselines: retraining; ``lightgcn-svd``: re-truncation; RULE: a new
  search), its accuracy at each step and the bytes a device downloads.
* :func:`sweep` (RQ3, Fig. 5): one hyper-parameter over a list of values, a run folder per value
  (re-running skips the finished ones), evaluated at one budget on validation and test.
* :func:`latency` (RQ5, Table IV) lives in :mod:`peel.latency` (the ranking processes import
  numpy only); this module only drives it.

Each experiment is a thin caller of the public API (:mod:`peel.pipeline`, :mod:`peel.device`,
:mod:`peel.baselines`) and writes a folder: ``report.md``, a CSV and a JSON of every figure, a
PNG (when matplotlib is installed), the command, the machine and every stage's wall-clock.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from peel import __version__, pipeline, runfolder
from peel.budget import full_table_bytes, parse_budget, prefix_sizes
from peel.data import InteractionData
from peel.device import Package, open_package
from peel.io import atomic_path, check_output_dir, read_json, write_json, write_text

#: The paper's Fig. 3 sequence (25 -> 10 -> 5 MB as fractions of the full table) and a budget
#: that grows back, which a device cannot serve from what it holds.
DYNAMIC_BUDGETS = ("0.533", "0.213", "0.107", "0.533")
METRICS = ("recall@20", "ndcg@20", "recall@50", "ndcg@50")
#: What each kind of baseline does for its first deployment and when the budget changes
#: (:func:`baseline_actions`; default: "train (server)", then "retrain").
TRUNCATE_ACTIONS = ("rotate stage 1 + truncate", "re-truncate")
SEARCH_ACTIONS = ("search (server)", "new search")


def baseline_actions(name: str) -> tuple[str, str]:
    """(first deployment, every change) of baseline ``name``: the truncations of stage 1
    (``lightgcn-svd`` and its quantised twins) re-truncate, RULE searches again, the rest
    retrain."""
    from peel.baselines import REGISTRY, LightGCNSVD, Rule

    cls = REGISTRY[name]
    if issubclass(cls, LightGCNSVD):
        return TRUNCATE_ACTIONS
    if issubclass(cls, Rule):
        return SEARCH_ACTIONS
    return ("train (server)", "retrain")


def builds_on_stage1(name: str) -> bool:
    """Whether ``name``'s first deployment also costs the run's stage 1 (the truncations,
    LightRec's teacher, RULE's blocks)."""
    from peel.baselines import Rule, from_stage1_tables

    return from_stage1_tables(name) or name == Rule.name


# ---------------------------------------------------------------------------------------------
# What every report records: command, machine, stage wall-clock
# ---------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """The machine the figures were measured on (timings mean nothing without it)."""
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": sys.version.split()[0],
        "numpy": np.__version__, "cpus": os.cpu_count(),
        "threads_env": {v: os.environ.get(v) for v in
                        ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
        "peel_version": __version__,
    }
    with contextlib.suppress(OSError):  # not on every platform
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gb"] = round(int(line.split()[1]) / 2**20, 1)
    return info


class Stages:
    """Wall-clock of each named stage of an experiment, in the order they ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, progress: bool = False) -> Iterator[None]:
        if progress:
            print(f"[peel] {name} ...", flush=True)
        t0 = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that made a report (``peel experiment ...`` from the CLI)."""
    args = list(sys.argv if argv is None else argv)
    if args and args[0].endswith(("peel", "cli.py", "__main__.py")):
        args[0] = "peel"
    return " ".join(args)


def header_lines(title: str, meta: dict[str, Any]) -> list[str]:
    """The Markdown head every report shares: command, machine, stage wall-clock."""
    m = meta["machine"]
    out = [f"# {title}", "", f"Command: `{meta['command']}`", "",
           f"Machine: {m.get('cpu', '?')}, {m.get('cpus')} logical CPUs, "
           f"{m.get('memory_gb', '?')} GB RAM, {m['platform']}, Python {m['python']}, "
           f"numpy {m['numpy']}; load average at start {m.get('load_average')}. "
           "Timings are upper bounds: the machine is shared with other jobs.", "",
           "Stage wall-clock (s): " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                meta["stages"].items()), ""]
    return out


def to_csv(records: Sequence[dict[str, Any]]) -> str:
    """Flat CSV of dict records (columns: the union of keys, first-seen order)."""
    import csv
    import io

    cols = list(dict.fromkeys(k for r in records for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: (json.dumps(v) if isinstance(v, dict | list) else v)
                         for k, v in r.items()})
    return buf.getvalue()


def md_table(records: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[str]:
    """A Markdown table of ``columns``; floats to 4 significant places."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in records]
    return lines


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None without the ``plot`` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save_figure(fig: Any, path: Path) -> None:
    plt = _pyplot()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# RQ2: dynamic budgets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DynamicConfig:
    """The budget sequence, the methods compared and how steps are timed."""

    budgets: tuple[str, ...] = DYNAMIC_BUDGETS
    baselines: tuple[str, ...] = ("lightgcn-svd",)
    split: str = "test"  # reporting only: nothing here chooses a setting
    shrink_reps: int = 5  # an on-device shrink takes microseconds: median of this many
    metric: str = "recall@20"  # the accuracy panel of the plot
    #: take a baseline's fits from RUN/eval.json when it holds the method at every budget of
    #: the sequence (test split only): the fit time `peel evaluate` measured and its test
    #: metrics, instead of fitting again (a fit is deterministic for the run's seed)
    from_eval: bool = False

    def validate(self) -> None:
        from peel.baselines import check_names

        if len(self.budgets) < 2:
            raise ValueError("dynamic: give at least two budgets (a start and a change)")
        check_names(self.baselines, "--baselines")
        if self.split not in ("test", "valid"):
            raise ValueError(f"--split {self.split!r}: expected test or valid")
        if self.shrink_reps < 1:
            raise ValueError("shrink_reps must be >= 1")
        if self.metric not in METRICS:
            raise ValueError(f"metric {self.metric!r}: expected one of {', '.join(METRICS)}")


@dataclass
class Step:
    """One method after one budget change: what it did, how long, what it downloads, and
    its accuracy (per-user metrics kept for PEEL, for the shrink == fresh deploy check)."""

    method: str
    step: int
    budget: str
    budget_bytes: int
    action: str
    seconds: float  # measured now
    recorded_seconds: float = 0.0  # training time recorded in the run folder (step 0 only)
    download_bytes: int = 0
    full_download_bytes: int = 0
    bytes_used: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    users: np.ndarray | None = None
    per_user: dict[str, np.ndarray] | None = None

    def record(self) -> dict[str, Any]:
        """The JSON/CSV row (no per-user arrays)."""
        skip = ("users", "per_user", "metrics", "detail")
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        return {**out, **self.metrics, "detail": self.detail}


def _sized(budgets: Sequence[str], full: int) -> list[tuple[int, str]]:
    return [(parse_budget(b, full), b) for b in budgets]


def run_training_seconds(run: str | Path) -> dict[str, float]:
    """Server training time recorded by ``peel train`` (stage 1 summed over resumes)."""
    path = Path(run) / "train_summary.json"
    if not path.exists():
        return {}
    summary = read_json(path)
    secs = dict(summary.get("seconds", {}))
    stage1 = summary.get("pretrain_seconds_all_sessions")
    if stage1 is not None:
        secs["pretrain"] = float(stage1)
    return {k: float(v) for k, v in secs.items()}


def _median_seconds(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    times, value = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), value


def held_block_bytes(old: Package, new: Package) -> int:
    """Bytes of ``new``'s item blocks that a device holding ``old`` already has: the common
    prefix of the two selection orders (same block, same storage kind)."""
    n = min(old.n_selected, new.n_selected)
    same = (np.all(old.selection[:n] == new.selection[:n], axis=1)
            & (old.kinds[:n] == new.kinds[:n]))
    common = int(np.argmin(same)) if not same.all() else n
    spec = new.spec
    unit = 1 if spec.mixed else 4 * spec.block_dim
    sizes = prefix_sizes(spec, new.selection[:common], new.kinds[:common] if spec.mixed
                         else None)
    return int(sizes[common]) * unit


@dataclass
class _GroupChain:
    """One user group's device package as the budget changes."""

    group: int
    users: np.ndarray
    vectors: np.ndarray
    exclude: Any  # csr rows of the users' seen items


def _rank_users(pkg: Package, chain: _GroupChain, k: int) -> np.ndarray:
    rows = chain.exclude
    ranked = pkg.rank_batch(chain.vectors, k=k, exclude_indptr=rows.indptr,
                            exclude_indices=rows.indices)
    return pipeline._valid_topk(ranked.items)


def _peel_group_steps(arrays: Any, chain: _GroupChain, sized: list[tuple[int, str]],
                      options: Any, k: int, reps: int, tmp: Path
                      ) -> Iterator[tuple[str, float, int, int, Package]]:
    """(action, seconds, download bytes, full package bytes, package) of every step of one
    group: build at the first budget (server), then shrink on the device when the package
    holds the blocks, else a server round trip (build at the new budget, download the blocks
    the device lacks)."""
    from peel.package import build_package

    pkg: Package | None = None
    for i, (nbytes, _label) in enumerate(sized):
        path = tmp / f"g{chain.group}_s{i}.peel"
        complete = pkg is not None and pkg.n_selected == pkg.spec.n_pairs
        if pkg is not None and (nbytes <= pkg.budget or complete):
            seconds, pkg = _median_seconds(lambda p=pkg, b=nbytes: p.shrink(b), reps)
            yield "shrink on device", seconds, 0, pkg.report.file_bytes, pkg
            continue
        t0 = time.perf_counter()
        build_package(path, arrays, nbytes, group=chain.group, options=options)
        new = open_package(path)
        seconds = time.perf_counter() - t0
        full_bytes = new.report.file_bytes
        download = full_bytes - (held_block_bytes(pkg, new) if pkg is not None else 0)
        yield ("deploy (server)" if pkg is None else "server round trip"), seconds, download, \
            full_bytes, new
        pkg = new


def peel_dynamic(run: str | Path, data: InteractionData, cfg: Any, budgets: Sequence[str],
                 split: str = "test", reps: int = 5) -> list[Step]:
    """PEEL through a budget sequence, every user group's package on its own "device".

    A step's time: for an on-device shrink, the slowest group package's shrink (devices work
    in parallel; median of ``reps``); for a server deployment, the server's package builds
    (plus opening and verifying each package) summed over the groups (one server builds them
    all). Per-user metrics are kept (``Step.per_user``) so tests can compare a shrunk package
    with a fresh deployment at the same budget.
    """
    from peel.eval import metric_cutoffs, metrics_from_topk

    full = full_table_bytes(data.n_items, cfg.pretrain.dim)
    sized = _sized(budgets, full)
    options = pipeline.deploy_options(cfg, run)
    k = pipeline.ranking_k(cfg, data)
    ks = metric_cutoffs(k)
    truth, seen = data.split_matrix(split), data.seen_matrix(split)
    steps = [Step(cfg.run.label, i, label, nbytes, "", 0.0) for i, (nbytes, label)
             in enumerate(sized)]
    parts: list[dict[str, list[np.ndarray]]] = [{} for _ in sized]
    with tempfile.TemporaryDirectory(prefix="peel-dynamic-") as tmp:
        for g, _ in runfolder.group_files(run):
            arrays = runfolder.load_group(run, g)
            has = truth.getnnz(axis=1)[arrays.users] > 0
            chain = _GroupChain(g, arrays.users[has], arrays.user_emb[has],
                                seen[arrays.users[has]])
            for i, (action, secs, down, fbytes, pkg) in enumerate(
                    _peel_group_steps(arrays, chain, sized, options, k, reps, Path(tmp))):
                _add_group_step(steps[i], action, secs, down, fbytes, pkg)
                if len(chain.users):
                    topk = _rank_users(pkg, chain, k)
                    for key, val in metrics_from_topk(topk, chain.users, truth, ks).items():
                        parts[i].setdefault(key, []).append(val)
                    parts[i].setdefault("users", []).append(chain.users)
    for step, part in zip(steps, parts, strict=True):
        users = np.concatenate(part.pop("users", [np.zeros(0, dtype=np.int64)]))
        step.users = users
        step.per_user = {key: np.concatenate(v) for key, v in part.items()}
        step.metrics = {key: float(v.mean()) for key, v in step.per_user.items()}
        step.detail["users"] = len(users)
    steps[0].recorded_seconds = sum(run_training_seconds(run).values())
    return steps


def _add_group_step(step: Step, action: str, seconds: float, download: int, full_bytes: int,
                    pkg: Package) -> None:
    """Fold one group's step into the method's step (see :func:`peel_dynamic` for how)."""
    step.action = action
    on_device = action == "shrink on device"
    step.seconds = max(step.seconds, seconds) if on_device else step.seconds + seconds
    step.download_bytes = max(step.download_bytes, download)
    step.full_download_bytes = max(step.full_download_bytes, full_bytes)
    step.bytes_used = max(step.bytes_used, pkg.report.total)
    d = step.detail
    d["group_seconds_max"] = max(d.get("group_seconds_max", 0.0), seconds)
    d["group_seconds_sum"] = d.get("group_seconds_sum", 0.0) + seconds
    d["download_bytes_sum"] = d.get("download_bytes_sum", 0) + download
    d["full_package_bytes_sum"] = d.get("full_package_bytes_sum", 0) + full_bytes
    d["groups"] = d.get("groups", 0) + 1


def baseline_dynamic(name: str, run: str | Path, data: InteractionData, cfg: Any,
                     budgets: Sequence[str], split: str = "test") -> list[Step]:
    """One baseline through the budget sequence: at every step it is fitted again at the new
    budget (retraining for the fixed-size and compressed methods, re-truncation for
    ``lightgcn-svd``, a new search for RULE), timed, and scored on ``split``. The device
    downloads the whole new table every time."""
    from peel.baselines import make_baseline
    from peel.eval import evaluate as evaluate_scorer
    from peel.eval import metric_cutoffs

    full = full_table_bytes(data.n_items, cfg.pretrain.dim)
    ks = metric_cutoffs(pipeline.ranking_k(cfg, data))
    t0 = time.perf_counter()
    model = make_baseline(name, cfg.pretrain, run=run)
    setup = time.perf_counter() - t0  # e.g. lightgcn-svd's rotation of the run's stage 1
    steps = []
    for i, (nbytes, label) in enumerate(_sized(budgets, full)):
        t0 = time.perf_counter()
        model.fit(data, nbytes)
        seconds = time.perf_counter() - t0 + (setup if i == 0 else 0.0)
        metrics = evaluate_scorer(model.scorer(), data, split, ks=ks).metrics
        action = baseline_actions(name)[0 if i == 0 else 1]
        steps.append(Step(model.label, i, label, nbytes, action,
                          seconds, download_bytes=model.bytes_used,
                          full_download_bytes=model.bytes_used, bytes_used=model.bytes_used,
                          metrics=metrics, detail=_jsonable_params(model.params)))
    return _with_stage1_time(steps, name, run)


def eval_dynamic(name: str, run: str | Path, data: InteractionData, cfg: Any,
                 budgets: Sequence[str]) -> list[Step] | None:
    """:func:`baseline_dynamic`'s steps from the fits ``peel evaluate`` already made and
    saved in RUN/eval.json (its measured fit seconds: for a tuned row, the chosen setting's
    fit; its test metrics), or None when a budget of the sequence, or a row's fit time, is
    missing there. Why: a fit at a budget is the same for the run's seed whether evaluate
    or this experiment runs it, and on gowalla each costs up to an hour."""
    from peel.baselines import REGISTRY

    path = Path(run) / "eval.json"
    if baseline_actions(name)[1] != "retrain" or not path.exists():  # cheap: redo it here
        return None
    label = REGISTRY[name].label
    rows = {r["budget"]: r for r in read_json(path)["rows"] if r["method"] == label}
    if any(b not in rows or "seconds" not in rows[b]["detail"] for b in budgets):
        return None
    full = full_table_bytes(data.n_items, cfg.pretrain.dim)
    steps = []
    for i, (nbytes, b) in enumerate(_sized(budgets, full)):
        r = rows[b]
        if r["budget_bytes"] != nbytes:
            return None
        steps.append(Step(label, i, b, nbytes, "train (server)" if i == 0 else "retrain",
                          float(r["detail"]["seconds"]), download_bytes=r["bytes_used"],
                          full_download_bytes=r["bytes_used"], bytes_used=r["bytes_used"],
                          metrics=dict(r["metrics"]),
                          detail={**r["detail"], "timed_by": "peel evaluate (eval.json)"}))
    return _with_stage1_time(steps, name, run)


def _with_stage1_time(steps: list[Step], name: str, run: str | Path) -> list[Step]:
    """A method built on the run's stage 1 also pays its recorded training at step 0."""
    if builds_on_stage1(name):
        steps[0].recorded_seconds = run_training_seconds(run).get("pretrain", 0.0)
    return steps


def _jsonable_params(params: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(params, default=str))


def accumulate(steps: list[Step]) -> list[dict[str, Any]]:
    """Rows with the accumulated deployment time (recorded training + measured steps) and
    the accumulated measured time after the first deployment."""
    rows, total, after = [], 0.0, 0.0
    for s in steps:
        total += s.seconds + s.recorded_seconds
        after += s.seconds if s.step > 0 else 0.0
        rows.append({**s.record(), "accumulated_seconds": total,
                     "accumulated_after_first_seconds": after})
    return rows


def _open_experiment(run: str | Path, out: str | Path, progress: bool
                     ) -> tuple[Path, Path, Stages, Any, InteractionData]:
    """Every experiment's start: a writable report folder, a complete run, its config and
    data (timed as the first stage)."""
    out = check_output_dir(out)
    stages = Stages()
    run = runfolder.require_run(run)
    runfolder.check_complete(run)
    with stages("load run and data", progress):
        cfg = pipeline.load_run_config(run)
        data = pipeline.run_data(run, cfg)
    return out, run, stages, cfg, data


def dynamic(run: str | Path, out: str | Path, config: DynamicConfig | None = None,
            progress: bool = False, command: str | None = None) -> dict[str, Any]:
    """RQ2 / Fig. 3: every method through ``config.budgets``; writes the report to ``out``."""
    config = config or DynamicConfig()
    config.validate()
    out, run, stages, cfg, data = _open_experiment(run, out, progress)
    with stages(cfg.run.label, progress):
        by_method = {cfg.run.label: accumulate(peel_dynamic(
            run, data, cfg, config.budgets, config.split, config.shrink_reps))}
    for name in config.baselines:
        with stages(name, progress):
            steps = (eval_dynamic(name, run, data, cfg, config.budgets)
                     if config.from_eval and config.split == "test" else None)
            by_method[name] = accumulate(steps or baseline_dynamic(
                name, run, data, cfg, config.budgets, config.split))
    rows = [r for method_rows in by_method.values() for r in method_rows]
    meta = {"command": command or command_line(), "machine": machine_info(),
            "stages": stages.seconds, "run": str(run), "dataset": data.name,
            "config": asdict(config), "full_table_bytes": full_table_bytes(
                data.n_items, cfg.pretrain.dim),
            "training_seconds_recorded": run_training_seconds(run)}
    write_json(out / "dynamic.json", {"meta": meta, "rows": rows})
    plotted = write_dynamic_report(out, rows, meta)
    return {"out": str(out), "rows": rows, "plot": plotted, "meta": meta}


def write_dynamic_report(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> bool:
    """CSV, PNG and Markdown from the rows (also to re-render a saved ``dynamic.json``)."""
    write_text(out / "dynamic.csv", to_csv([{k: v for k, v in r.items() if k != "detail"}
                                            for r in rows]))
    plotted = plot_dynamic(rows, meta["config"]["metric"], out / "dynamic.png")
    write_text(out / "report.md", dynamic_markdown(rows, meta, plotted))
    return plotted


def dynamic_markdown(rows: list[dict[str, Any]], meta: dict[str, Any], plotted: bool) -> str:
    cfg = meta["config"]
    out = header_lines(f"Dynamic budgets (RQ2, Fig. 3): {meta['dataset']}", meta)
    out += [f"Budget sequence {' -> '.join(cfg['budgets'])} (fractions of the full float32 "
            f"item table, {meta['full_table_bytes']:,} B); accuracy on the {cfg['split']} "
            "split (reporting only, nothing is chosen from it).", "",
            "What each method does after a change, timed here (`seconds`):",
            "",
            "* PEEL: each user group's package is a device; a smaller budget is an on-device "
            "`Package.shrink` (the slowest group's, median of "
            f"{cfg['shrink_reps']} repeats; devices work in parallel); a budget the package "
            "cannot serve is a server round trip: the server builds every group's package at "
            "the new budget (summed over groups) and a device downloads only the blocks it "
            "lacks (`download_bytes`, the largest group's; `full_download_bytes` is a whole "
            "new package). Network transfer time is not included.",
            "* fixed-size and compressed baselines: retrained at the new size (the fit, timed); "
            "`lightgcn-svd`: re-truncation of the run's SVD-rotated stage 1; RULE: a new "
            "labelling, estimator and search. Their device downloads the whole new table. "
            "When a budget comes back, a server that kept the model of that budget could resend it "
            "without retraining; here every change is refitted, as the paper assumes.",
            "* step 0 also counts the training recorded in the run folder "
            "(`recorded_seconds`: PEEL's stage 1 + groups + stage 2; stage 1 for the methods "
            "built on it); `accumulated_seconds` adds both, "
            "`accumulated_after_first_seconds` only the measured changes after step 0.", ""]
    reused = sorted({r["method"] for r in rows
                     if r.get("detail", {}).get("timed_by") == "peel evaluate (eval.json)"})
    if reused:
        out += ["Taken from the run's `eval.json` (`--from-eval`), not fitted again here: "
                f"{', '.join(reused)}. Their `seconds` are the fit times `peel evaluate` "
                "measured for each budget (for a tuned row, the chosen setting's fit; "
                "rows merged from another machine were timed there) and their metrics "
                "its test figures; a repeated budget repeats its fit, as a deterministic "
                "retraining would.", ""]
    out += ["Per method, after the first deployment (every change together; "
            "`full_download_bytes`: a whole new table at every change):", ""]
    out += md_table(dynamic_summary(rows, cfg["metric"]), ["method", "changes", "measured_seconds",
                                            "download_bytes", "full_download_bytes",
                                            f"min {cfg['metric']}", f"max {cfg['metric']}"])
    out += ["", "Every step:", ""]
    cols = ["method", "step", "budget", "action", "seconds", "recorded_seconds",
            "accumulated_seconds", "accumulated_after_first_seconds", "download_bytes",
            "full_download_bytes", "bytes_used", *METRICS]
    out += md_table(rows, cols)
    out += ["", "Files: `dynamic.json` (every row, with each method's details and the "
            "metadata), `dynamic.csv`"
            + (", `dynamic.png` (accuracy, accumulated deployment time and each step's "
               "measured time)."
               if plotted else " (no plot: matplotlib is not installed).")]
    return "\n".join(out) + "\n"


def dynamic_summary(rows: list[dict[str, Any]], metric: str = "recall@20"
                    ) -> list[dict[str, Any]]:
    """Per method: the changes after step 0 together (time, bytes downloaded, a whole new
    table each time), and the range of its accuracy over the sequence."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        sub = [r for r in rows if r["method"] == method]
        later = [r for r in sub if r["step"] > 0]
        out.append({"method": method, "changes": len(later),
                    "measured_seconds": sum(r["seconds"] for r in later),
                    "download_bytes": sum(r["download_bytes"] for r in later),
                    "full_download_bytes": sum(r["full_download_bytes"] for r in later),
                    f"min {metric}": min(r[metric] for r in sub),
                    f"max {metric}": max(r[metric] for r in sub)})
    return out


def plot_dynamic(rows: list[dict[str, Any]], metric: str, path: Path) -> bool:
    """Fig. 3's two panels, accuracy per step and accumulated deployment time (log, with the
    recorded training), and a third: the measured time of each step alone (log), which the
    training time would otherwise hide."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    panels = ((metric, lambda r: r[metric]),
              ("accumulated deployment time (s)", lambda r: r["accumulated_seconds"]),
              ("measured time of this step (s)", lambda r: r["seconds"]))
    for method in dict.fromkeys(r["method"] for r in rows):
        sub = [r for r in rows if r["method"] == method]
        for ax, (_, value) in zip(axes, panels, strict=True):
            ax.plot([r["step"] for r in sub], [max(value(r), 1e-7) for r in sub], marker="o",
                    label=method)
    labels = [f"{r['step']}: {r['budget']}" for r in rows if r["method"] == rows[0]["method"]]
    for ax, (ylabel, _) in zip(axes, panels, strict=True):
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("step: budget (fraction of the full table)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    _save_figure(fig, path)
    return True




# ---------------------------------------------------------------------------------------------
# RQ5: on-device latency (the timed processes are peel.latency workers)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyConfig:
    """Budgets (empty: the run's), methods, users timed and simulated devices."""

    budgets: tuple[str, ...] = ()
    baselines: tuple[str, ...] = ("lightgcn-svd",)
    users: int = 200
    devices: tuple[str, ...] = ("iot", "cellphone")
    k: int = 50
    warmup: int = 10
    seed: int = 0
    #: cap on the baselines' training epochs (None: their configured fits). Why: ranking time
    #: depends on what a model stores, which the budget fixes (DLRM-CE's m, LightRec's B, a
    #: table's width), not on how well it was trained; ESAPN's / AutoEmb's searched sizes are
    #: the exception, so their rows are then the sizes a short search found (the report says).
    fit_epochs: int | None = None

    def validate(self) -> None:
        from peel.baselines import check_names
        from peel.latency import DEVICES

        check_names(self.baselines, "--baselines")
        bad = [d for d in self.devices if d not in DEVICES]
        if bad or not self.devices:
            raise ValueError(f"--devices {','.join(bad) or '(none)'}: expected any of "
                             f"{', '.join(DEVICES)}")
        if self.users < 1 or self.k < 1:
            raise ValueError("--users and --k must be positive")
        if self.fit_epochs is not None and self.fit_epochs < 1:
            raise ValueError(f"--fit-epochs {self.fit_epochs}: expected a positive number")


@dataclass(frozen=True)
class DeviceModel:
    """What a worker loads: a model file, its kind and the bytes of its item data."""

    method: str
    budget: str
    kind: str  # package | dot | qr | lightrec | multidim | quantized
    model: Path
    users: Path
    item_bytes: int
    bytes_used: int
    extra: dict[str, Any] = field(default_factory=dict)


def latency_users(run: Path, data: InteractionData, split: str, n: int, seed: int
                  ) -> tuple[int, np.ndarray]:
    """The largest user group and up to ``n`` of its users with held-out items (a random,
    seeded choice): every method is timed on these users."""
    sizes = [(len(runfolder.load_group(run, g).users), g) for g, _ in runfolder.group_files(run)]
    group = max(sizes)[1]
    users = runfolder.load_group(run, group).users
    users = users[data.split_matrix(split).getnnz(axis=1)[users] > 0]
    rng = np.random.default_rng(seed)
    return group, np.sort(rng.choice(users, min(n, len(users)), replace=False))


def _save_users(path: Path, vectors: np.ndarray, exclude: Any) -> Path:
    from peel.io import save_npz

    save_npz(path, {"users": np.ascontiguousarray(vectors, dtype=np.float32),
                    "exclude_indptr": exclude.indptr.astype(np.int64),
                    "exclude_indices": exclude.indices.astype(np.int64)})
    return path


def peel_device_model(run: Path, cfg: Any, group: int, users: np.ndarray, exclude: Any,
                      budget: str, tmp: Path) -> DeviceModel:
    """PEEL: the group's package at ``budget``, built with the run's deploy settings."""
    from peel.package import build_package

    arrays = runfolder.load_group(run, group)
    path = tmp / f"peel_{budget}.peel"
    full = full_table_bytes(arrays.n_items, cfg.pretrain.dim)
    report = build_package(path, arrays, parse_budget(budget, full), group=group,
                           options=pipeline.deploy_options(cfg, run))
    rows = np.array([arrays.user_row(int(u)) for u in users], dtype=np.int64)
    upath = _save_users(tmp / f"peel_{budget}_users.npz", arrays.user_emb[rows], exclude)
    return DeviceModel(cfg.run.label, budget, "package", path, upath, report.item_blocks,
                       report.total, {"blocks": report.n_selected})


def baseline_device_model(model: Any, budget: str, users: np.ndarray, exclude: Any,
                          tmp: Path) -> DeviceModel | str:
    """A fitted baseline's device arrays, or why it has no device ranking here."""
    from peel.baselines import DLRMCE, EmbeddingRecommender, LightRec, Rule
    from peel.baselines.multidim import MultiDimRecommender
    from peel.io import save_npz

    name = model.name
    upath = _save_users(tmp / f"{name}_{budget}_users.npz", model.user_emb[users], exclude)
    mpath = tmp / f"{name}_{budget}.npz"
    if isinstance(model, Rule):
        path = tmp / f"{name}_{budget}.peel"
        model.package.save(path)
        return DeviceModel(model.label, budget, "package", path, upath,
                           model.package.report.item_blocks, model.bytes_used)
    if isinstance(model, DLRMCE):
        save_npz(mpath, {"q": model.arrays["q"], "r": model.arrays["r"]})
        return DeviceModel(model.label, budget, "qr", mpath, upath,
                           model.arrays["q"].nbytes + model.arrays["r"].nbytes,
                           model.bytes_used, {"op": model.options.op})
    if isinstance(model, LightRec):
        save_npz(mpath, {"codebooks": model.arrays["codebooks"], "codes": model.arrays["codes"]})
        return DeviceModel(model.label, budget, "lightrec", mpath, upath,
                           model.arrays["codebooks"].nbytes + model.arrays["codes"].nbytes,
                           model.bytes_used)
    if isinstance(model, MultiDimRecommender):  # ESAPN, AutoEmb: tables per size + lifts
        save_npz(mpath, model.arrays)
        return DeviceModel(model.label, budget, "multidim", mpath, upath,
                           sum(a.nbytes for a in model.arrays.values()), model.bytes_used,
                           {"sizes": list(model.sizes), "method": model.method})
    table = getattr(model, "stored_table", None)
    if table is not None:  # lightgcn-fp16 / -int8 / -int4 and their lightgcn-svd twins
        save_npz(mpath, table)
        return DeviceModel(model.label, budget, "quantized", mpath, upath,
                           sum(a.nbytes for a in table.values()), model.bytes_used,
                           {"quant_kind": int(model.kind), "dim": int(model.params["dim"])})
    if type(model).scorer is EmbeddingRecommender.scorer and model.item_emb is not None:
        item = np.ascontiguousarray(model.item_emb, dtype=np.float32)
        save_npz(mpath, {"item_emb": item})
        return DeviceModel(model.label, budget, "dot", mpath, upath, item.nbytes,
                           model.bytes_used)
    return f"{name}: no device ranking path in peel.latency"


def run_worker(spec: dict[str, Any], tmp: Path, tag: str, timeout: float = 1800.0
               ) -> dict[str, Any]:
    """Time one spec in a fresh ``python -m peel.latency`` process set up as its device."""
    import subprocess

    from peel.latency import THREAD_VARS

    spec_path, result_path = tmp / f"{tag}.json", tmp / f"{tag}_result.json"
    spec_path.write_text(json.dumps(spec))
    threads = str(spec["device"]["threads"])
    env = {**os.environ, **dict.fromkeys(THREAD_VARS, threads)}
    src = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "peel.latency", str(spec_path),
                           str(result_path)], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.returncode != 0 or not result_path.exists():
        return {"status": f"worker exited {proc.returncode}", "error": proc.stderr[-300:]}
    return json.loads(result_path.read_text())


def time_device_model(dm: DeviceModel, device: Any, n_users: int, n_items: int,
                      cfg: LatencyConfig, tmp: Path) -> dict[str, Any]:
    """One row of Table IV: the model's per-user top-k and the floor of its bytes."""
    base = {"device": asdict(device), "k": cfg.k, "n_users": n_users, "warmup": cfg.warmup,
            "n_items": n_items}
    tag = f"{dm.method}_{dm.budget}_{device.name}".replace(" ", "_").replace("/", "_")
    rank = run_worker({**base, "kind": dm.kind, "model": str(dm.model),
                       "users": str(dm.users), "floor_bytes": dm.item_bytes, **dm.extra},
                      tmp, tag)
    floor = rank.pop("floor", {})
    row = {"device": device.name, "threads": device.threads, "memory_cap_mb": device.memory_mb,
           "method": dm.method, "budget": dm.budget, "bytes_used": dm.bytes_used,
           "item_bytes": dm.item_bytes, "status": rank.get("status"),
           "p50_ms": rank.get("p50_ms"), "p99_ms": rank.get("p99_ms"),
           "mean_ms": rank.get("mean_ms"), "cpu_p50_ms": rank.get("cpu_p50_ms"),
           "floor_p50_ms": floor.get("p50_ms"), "floor_status": floor.get("status"),
           "peak_rss_mb": rank.get("peak_rss_mb"),
           "rss_before_model_mb": rank.get("rss_before_model_mb"),
           "load_ms": rank.get("load_ms")}
    row["floor_cpu_p50_ms"] = floor.get("cpu_p50_ms")
    if row["p50_ms"] is not None and row["floor_p50_ms"]:
        row["ratio"] = row["p50_ms"] / row["floor_p50_ms"]
    if row["cpu_p50_ms"] is not None and row["floor_cpu_p50_ms"]:
        row["cpu_ratio"] = row["cpu_p50_ms"] / row["floor_cpu_p50_ms"]
    row["worker"] = {k: v for k, v in rank.items() if k not in row}
    return row


def _latency_models(run: Path, cfg: Any, data: InteractionData, config: LatencyConfig,
                    budgets: Sequence[str], tmp: Path, stages: Stages, progress: bool
                    ) -> tuple[list[DeviceModel], dict[str, str], np.ndarray]:
    """Every method's device model at every budget (baselines fitted here, timed as stages)."""
    from peel.baselines import make_baseline

    group, users = latency_users(run, data, "test", config.users, config.seed)
    exclude = data.seen_matrix("test")[users]
    full = full_table_bytes(data.n_items, cfg.pretrain.dim)
    models, skipped = [], {}
    with stages("PEEL packages", progress):
        models += [peel_device_model(run, cfg, group, users, exclude, b, tmp) for b in budgets]
    pretrain = cfg.pretrain if config.fit_epochs is None else replace(
        cfg.pretrain, epochs=min(cfg.pretrain.epochs, config.fit_epochs))
    for name in config.baselines:
        with stages(f"fit {name}", progress):
            model = make_baseline(name, pretrain, run=run)
            for b in budgets:
                dm = baseline_device_model(model.fit(data, parse_budget(b, full)), b, users,
                                           exclude, tmp)
                if isinstance(dm, str):
                    skipped[name] = dm
                    break
                models.append(dm)
    return models, skipped, users


def latency(run: str | Path, out: str | Path, config: LatencyConfig | None = None,
            progress: bool = False, command: str | None = None) -> dict[str, Any]:
    """RQ5 / Table IV: per-user top-k latency of every method at every budget on each
    simulated device (:data:`peel.latency.DEVICES`), with the memory-read floor."""
    from peel.latency import DEVICES

    config = config or LatencyConfig()
    config.validate()
    out, run, stages, cfg, data = _open_experiment(run, out, progress)
    budgets = list(config.budgets or cfg.deploy.budgets)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="peel-latency-") as tmp:
        models, skipped, users = _latency_models(run, cfg, data, config, budgets, Path(tmp),
                                                 stages, progress)
        for name in config.devices:
            with stages(f"time on {name}", progress):
                rows += [time_device_model(dm, DEVICES[name], len(users), data.n_items,
                                           config, Path(tmp)) for dm in models]
    meta = {"command": command or command_line(), "machine": machine_info(),
            "stages": stages.seconds, "run": str(run), "dataset": data.name,
            "config": asdict(config), "budgets": budgets, "skipped": skipped,
            "devices": {n: asdict(DEVICES[n]) for n in config.devices},
            "full_table_bytes": full_table_bytes(data.n_items, cfg.pretrain.dim)}
    write_json(out / "latency.json", {"meta": meta, "rows": rows})
    plotted = write_latency_report(out, rows, meta)
    return {"out": str(out), "rows": rows, "plot": plotted, "meta": meta}


def write_latency_report(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> bool:
    """CSV, PNG and Markdown from the rows (also to re-render a saved ``latency.json``)."""
    write_text(out / "latency.csv", to_csv([{k: v for k, v in r.items() if k != "worker"}
                                            for r in rows]))
    plotted = plot_latency(rows, out / "latency.png")
    write_text(out / "report.md", latency_markdown(rows, meta, plotted))
    return plotted


def latency_markdown(rows: list[dict[str, Any]], meta: dict[str, Any], plotted: bool) -> str:
    cfg = meta["config"]
    out = header_lines(f"On-device latency (RQ5, Table IV): {meta['dataset']}", meta)
    devices = "; ".join(f"{n}: {d['threads']} thread(s), {d['memory_mb']} MB cap"
                        for n, d in meta["devices"].items())
    out += [f"Time to produce one user's top-{cfg['k']} list (the user's known items "
            f"excluded), {cfg['users']} users of the largest user group (after "
            f"{cfg['warmup']} untimed calls), each method at each budget in a fresh process "
            f"that imports numpy and the device runtime only. Devices: {devices}.", "",
            "How the devices are simulated: the BLAS thread variables are set to the "
            "device's threads and the process is pinned to that many cores "
            "(`os.sched_setaffinity`). This machine has "
            f"{meta['machine'].get('cpus')} logical CPUs, so the paper's 4-vCPU cellphone "
            "gets 2. The memory cap is `resource.setrlimit(RLIMIT_AS)` set, after the "
            "interpreter, numpy and the runtime are loaded, to their address space plus the "
            "device's memory: the model (a PEEL or RULE package is memory-mapped, other "
            "models are read into memory), the user vectors and every ranking buffer must fit "
            "in it, or the row fails. CPython and numpy alone occupy ~150 MB of address "
            "space (~35 MB resident), which a native runtime on a phone would not, so they "
            "are outside the cap. `peak_rss_mb` is the ranking process's peak resident size "
            "(`VmHWM` of /proc/self/status; `resource.getrusage(RUSAGE_SELF).ru_maxrss`, in "
            "`latency.json`, is not usable here: Linux carries the parent's peak across "
            "fork + exec), `rss_before_model_mb` its resident size before the model was "
            "loaded.", "",
            "The floor (`floor_p50_ms`) is what reading the model's item bytes (`item_bytes`) "
            "once and picking a top-k must cost: a float32 matrix-vector product over a dense "
            "array of the same bytes plus `np.argpartition` of one score per item, timed in "
            "the same process (same threads and cap) once the model is freed; `ratio` = "
            "p50 / floor.", ""]
    if cfg.get("fit_epochs") is not None:
        out += [f"The baselines were fitted for at most {cfg['fit_epochs']} epoch(s) "
                "(`--fit-epochs`): their ranking time depends on what they store, which the "
                "budget fixes, not on how well they were trained; ESAPN's and AutoEmb's "
                "item sizes are those a search of that length found.", ""]
    if meta["skipped"]:
        out += ["Not timed: " + "; ".join(f"{k} ({v})" for k, v in meta["skipped"].items()),
                ""]
    table, cols = latency_pivot(rows)
    out += ["Table IV layout (ms per user: wall-clock p50 and p99, and the ranking "
            "process's CPU time p50, which leaves out the time it waited for a core on this "
            "shared machine; `cpu x` = CPU p50 / the floor's CPU p50):", ""]
    out += md_table(table, cols)
    out += ["", "Every row:", ""]
    cols = ["device", "method", "budget", "bytes_used", "item_bytes", "p50_ms", "p99_ms",
            "floor_p50_ms", "ratio", "cpu_p50_ms", "floor_cpu_p50_ms", "cpu_ratio",
            "peak_rss_mb", "rss_before_model_mb", "status"]
    out += md_table(rows, cols)
    out += ["", "Files: `latency.json` (every row with the worker's details and the "
            "metadata), `latency.csv`"
            + (", `latency.png` (CPU-time p50 and the floor's against the model's bytes, "
               "log scale, one panel per device)."
               if plotted else " (no plot: matplotlib is not installed).")]
    return "\n".join(out) + "\n"


#: Row field -> column of the Table IV layout (per device).
PIVOT_COLUMNS = (("p50_ms", "p50"), ("p99_ms", "p99"), ("cpu_p50_ms", "cpu p50"),
                 ("cpu_ratio", "cpu x"))


def latency_pivot(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """One line per method and budget, the devices side by side (Table IV's layout), and
    the second device's p50 over the first's."""
    devices = list(dict.fromkeys(r["device"] for r in rows))
    lines: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        line = lines.setdefault((r["method"], r["budget"]), {
            "method": r["method"], "budget": r["budget"], "MB": r["bytes_used"] / 1e6})
        for key, col in PIVOT_COLUMNS:
            line[f"{r['device']} {col}"] = r.get(key)
    cols = ["method", "budget", "MB", *(f"{d} {c}" for d in devices for _, c in PIVOT_COLUMNS)]
    if len(devices) == 2:
        name = f"{devices[1]}/{devices[0]} cpu p50"
        for line in lines.values():
            a, b = line.get(f"{devices[0]} cpu p50"), line.get(f"{devices[1]} cpu p50")
            line[name] = b / a if a and b else None
        cols.append(name)
    return list(lines.values()), cols


def plot_latency(rows: list[dict[str, Any]], path: Path) -> bool:
    """CPU-time p50 against the model's bytes, a panel per device, floors dashed, log scale
    (CPU time: wall-clock on a shared machine includes waiting for a core)."""
    plt = _pyplot()
    if plt is None or not rows:
        return False
    devices = list(dict.fromkeys(r["device"] for r in rows))
    fig, axes = plt.subplots(1, len(devices), figsize=(5.5 * len(devices), 4), squeeze=False)
    for ax, device in zip(axes[0], devices, strict=True):
        sub = [r for r in rows if r["device"] == device and r.get("cpu_p50_ms") is not None]
        for method in dict.fromkeys(r["method"] for r in sub):
            pts = sorted((r["bytes_used"] / 1e6, r["cpu_p50_ms"],
                          r.get("floor_cpu_p50_ms") or np.nan)
                         for r in sub if r["method"] == method)
            xs, ys, fs = zip(*pts, strict=True)
            line = ax.plot(xs, ys, marker="o", label=f"{method}")[0]
            ax.plot(xs, fs, linestyle="--", color=line.get_color(), label=f"{method} floor")
        ax.set_title(device)
        ax.set_xlabel("model bytes on the device (MB)")
        ax.set_ylabel("CPU ms per user, p50 (top-k)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save_figure(fig, path)
    return True



# ---------------------------------------------------------------------------------------------
# RQ3: hyper-parameter sweeps (a run folder per value; finished values are skipped)
# ---------------------------------------------------------------------------------------------

#: Settings whose change alters the full embedding: [pretrain] follows, stage 1 is retrained.
DIM_KEYS = ("finetune.n_blocks", "finetune.block_dim")
SWEEP_METRICS = ("recall@50", "ndcg@50")
SWEEP_RESULT = "sweep_result.json"


@dataclass(frozen=True)
class SweepConfig:
    """One ``section.key`` over ``values``, evaluated at ``budget`` (a fraction or bytes of
    the *base* run's full table, kept in bytes for every value)."""

    key: str
    values: tuple[str, ...]
    budget: str = "0.213"
    workers: int | None = None

    def validate(self) -> None:
        if not self.values:
            raise ValueError(f"--param {self.key}: give at least one value")
        if len(set(self.values)) != len(self.values):
            raise ValueError(f"--param {self.key}: values repeat")


def parse_param(text: str) -> tuple[str, tuple[str, ...]]:
    """``groups.n_item_groups=5,10`` -> ("groups.n_item_groups", ("5", "10"))."""
    key, sep, raw = text.partition("=")
    values = tuple(v.strip() for v in raw.split(",") if v.strip())
    if not sep or "." not in key or not values:
        raise ValueError(f"--param {text!r}: expected SECTION.KEY=V1,V2,..., e.g. "
                         "groups.n_item_groups=5,10,15,20,25")
    return key.strip(), values


def sweep_config(base: Any, key: str, value: str) -> Any:
    """The base run's configuration with ``key=value``; a change of the block count or size
    resizes stage 1 with it (``pretrain.dim`` = N x d)."""
    from peel.overrides import apply_overrides

    cfg = apply_overrides(base, [f"{key}={value}"])
    if key in DIM_KEYS:
        ft = cfg.finetune
        cfg = replace(cfg, pretrain=replace(cfg.pretrain, dim=ft.n_blocks * ft.block_dim,
                                            block_dim=ft.block_dim))
    cfg.validate()
    return cfg


def _trained_config(cfg: Any) -> dict[str, Any]:
    """What decides a run's training (not [deploy], not the worker count)."""
    d = json.loads(json.dumps(asdict(cfg), default=str))
    d.pop("deploy")
    d["run"].pop("workers")
    d["run"].pop("label")
    return d


def sweep_value(base_run: Path, base_cfg: Any, data: InteractionData, key: str, value: str,
                budget_bytes: int, folder: Path, workers: int | None, progress: bool,
                executor: Any = None) -> dict[str, Any]:
    """Train (or resume, or reuse) the run of one value and score it at ``budget_bytes`` on
    validation and test; the result is saved in the value's folder. ``executor`` (e.g. one
    :class:`peel.executor.RayExecutor` for the whole sweep) runs the groups' fine-tuning."""
    cfg = sweep_config(base_cfg, key, value)
    if workers is not None:
        cfg = replace(cfg, run=replace(cfg.run, workers=workers))
    timings: dict[str, float] = {}
    same_as_base = _trained_config(cfg) == _trained_config(base_cfg)
    reuse = same_as_base or asdict(cfg.pretrain) == asdict(base_cfg.pretrain)
    run = base_run if same_as_base else folder
    t0 = time.perf_counter()
    if not same_as_base:
        if reuse and not (folder / "pretrain" / "embeddings.safetensors").exists():
            pipeline.reuse_pretrain(base_run, folder, cfg)
        stored = cfg.run.data == runfolder.STORED
        pipeline.train(cfg, folder, progress=progress, data=data if stored else None,
                       executor=executor)
        cfg = pipeline.load_run_config(folder)
    timings["train"] = time.perf_counter() - t0
    metrics = {}
    for split in ("valid", "test"):
        t0 = time.perf_counter()
        row = pipeline.evaluate_peel(run, data, cfg, [str(budget_bytes)], split)[0]
        timings[f"evaluate {split}"] = time.perf_counter() - t0
        metrics[split] = row.metrics
    result = {"key": key, "value": value, "budget_bytes": budget_bytes, "run": str(run),
              "reused_stage1": reuse, "same_as_base_run": same_as_base,
              "full_dim": cfg.pretrain.dim, "bytes_used": row.bytes_used,
              "valid": metrics["valid"], "test": metrics["test"], "seconds": timings,
              "training_seconds_recorded": run_training_seconds(run)}
    write_json(folder / SWEEP_RESULT, result)
    return result


def _finished(folder: Path, key: str, value: str, budget_bytes: int) -> dict[str, Any] | None:
    path = folder / SWEEP_RESULT
    if not path.exists():
        return None
    saved = read_json(path)
    same = (saved.get("key"), saved.get("value"), saved.get("budget_bytes")) == (
        key, value, budget_bytes)
    return saved if same else None


def sweep(run: str | Path, out: str | Path, config: SweepConfig,
          progress: bool = False, command: str | None = None,
          executor: Any = None) -> dict[str, Any]:
    """RQ3 / Fig. 5: PEEL for every value of one hyper-parameter; a run folder per value
    under ``out/runs/`` (re-running skips the values whose result is saved). ``executor``
    runs every value's group fine-tuning (the caller keeps it open across values, so a Ray
    is started once per sweep); None: each run's ``run.workers`` local processes."""
    config.validate()
    out, run, stages, base_cfg, data = _open_experiment(run, out, progress)
    sweep_config(base_cfg, config.key, config.values[0])  # a bad key fails before work
    budget_bytes = parse_budget(config.budget, full_table_bytes(data.n_items,
                                                                base_cfg.pretrain.dim))
    rows = []
    for value in config.values:
        folder = out / "runs" / f"{config.key}={value}"
        saved = _finished(folder, config.key, value, budget_bytes)
        with stages(f"{config.key}={value}" + (" (saved)" if saved else ""), progress):
            result = saved or sweep_value(run, base_cfg, data, config.key, value,
                                          budget_bytes, folder, config.workers, progress,
                                          executor)
        rows.append({**result, "resumed_from_saved": saved is not None})
    meta = {"command": command or command_line(), "machine": machine_info(),
            "stages": stages.seconds, "run": str(run), "dataset": data.name,
            "config": asdict(config), "budget_bytes": budget_bytes,
            "base_value": _base_value(base_cfg, config.key)}
    flat = [_flat_sweep_row(r) for r in rows]
    write_json(out / "sweep.json", {"meta": meta, "rows": rows})
    write_text(out / "sweep.csv", to_csv(flat))
    name = config.key.replace(".", "_")
    plotted = plot_sweep(flat, config.key, out / f"{name}.png")
    write_text(out / "report.md", sweep_markdown(flat, meta, f"{name}.png" if plotted else None))
    return {"out": str(out), "rows": rows, "plot": plotted, "meta": meta}


def _base_value(cfg: Any, key: str) -> Any:
    sect, _, name = key.partition(".")
    return getattr(getattr(cfg, sect), name, None)


def _flat_sweep_row(r: dict[str, Any]) -> dict[str, Any]:
    row = {k: r[k] for k in ("key", "value", "full_dim", "budget_bytes", "bytes_used",
                             "reused_stage1", "same_as_base_run", "resumed_from_saved")}
    for split in ("valid", "test"):
        row.update({f"{split} {m}": r[split].get(m) for m in METRICS})
    # the base run's own value is not trained by the sweep: no time, rather than ~0 s
    row["train_seconds"] = None if r["same_as_base_run"] else r["seconds"].get("train")
    recorded = r.get("training_seconds_recorded", {})
    row["finetune_seconds_recorded"] = recorded.get("finetune")
    return row


def sweep_markdown(rows: list[dict[str, Any]], meta: dict[str, Any], png: str | None) -> str:
    cfg = meta["config"]
    key = cfg["key"]
    out = header_lines(f"Hyper-parameter sweep (RQ3, Fig. 5): {key} on {meta['dataset']}", meta)
    out += [f"PEEL with `{key}` in {', '.join(cfg['values'])} (the base run has "
            f"{meta['base_value']}), every other setting the base run's, evaluated at "
            f"{cfg['budget']} of the base run's full table = {meta['budget_bytes']:,} B (the "
            "same bytes for every value). Each value is its own run folder under `runs/`; a "
            "value equal to the base run's is the base run itself; values that leave "
            "[pretrain] unchanged reuse the base run's stage 1 (`reused_stage1`); "
            f"{', '.join(DIM_KEYS)} change the full dimension, so those runs train their own "
            "stage 1 (much slower). Validation figures are what a choice would be made on; "
            "test figures are reported only.", ""]
    cols = ["value", "full_dim", "bytes_used", "reused_stage1", "resumed_from_saved",
            *(f"{s} {m}" for s in ("valid", "test") for m in SWEEP_METRICS), "train_seconds",
            "finetune_seconds_recorded"]
    out += md_table(rows, cols)
    out += ["", "`train_seconds`: what this sweep spent training the value's run (empty for "
            "the base run's own value, which it reuses); `finetune_seconds_recorded`: stage 2 "
            "as the value's run recorded it, with that run's worker count."]
    out += ["", "Files: `sweep.json` (every value's metrics at @20 and @50, timings, run "
            "folder), `sweep.csv`" + (f", `{png}` (Recall@50 and NDCG@50, validation and "
                                      "test)." if png else " (no plot: no matplotlib).")]
    return "\n".join(out) + "\n"


def plot_sweep(rows: list[dict[str, Any]], key: str, path: Path) -> bool:
    """Fig. 5 for one parameter: Recall@50 and NDCG@50 against its value, valid and test."""
    plt = _pyplot()
    if plt is None or not rows:
        return False
    fig, axes = plt.subplots(1, len(SWEEP_METRICS), figsize=(10, 4))
    labels = [str(r["value"]) for r in rows]
    for ax, metric in zip(axes, SWEEP_METRICS, strict=True):
        for split, style in (("valid", "o-"), ("test", "s--")):
            ax.plot(range(len(rows)), [r[f"{split} {metric}"] for r in rows], style,
                    label=split)
        ax.set_xticks(range(len(rows)), labels)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save_figure(fig, path)
    return True


__all__ = ["DYNAMIC_BUDGETS", "DeviceModel", "DynamicConfig", "LatencyConfig", "Stages", "Step",
           "SweepConfig", "accumulate", "baseline_device_model", "baseline_dynamic", "dynamic",
           "held_block_bytes", "latency", "latency_users", "machine_info", "parse_param",
           "peel_device_model", "peel_dynamic", "run_training_seconds", "run_worker", "sweep",
           "sweep_config", "sweep_value", "time_device_model"]
