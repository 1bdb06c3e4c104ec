"""The whole method as one resumable run: data -> pretrain -> groups -> fine-tune -> evaluate.

A run folder holds everything needed to continue, evaluate or report it:

    RUN/config.toml            resolved configuration (every hyper-parameter)
    RUN/run.json               library version, command, seed, config
    RUN/pretrain/              stage 1 outputs (+ checkpoint/ while training)
    RUN/partition.npz          user group of every user, item group of every item
    RUN/groups/group_NNN.*     stage 2 outputs per user group
    RUN/train_summary.json     seconds per stage, group sizes
    RUN/eval.json              metrics per method and budget (from `peel evaluate`)

Each stage is skipped when its outputs exist and were made with the same configuration, so an
interrupted `peel train` re-run with the same arguments resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from peel import __version__
from peel.budget import SCALES, SELECTIONS
from peel.config import check_sections, read_toml, section, to_toml
from peel.data import DataConfig, InteractionData, load_dataset
from peel.elastic import FinetuneConfig, finetune_groups
from peel.groups import GroupConfig, make_item_groups, make_user_groups
from peel.io import (
    atomic_path,
    check_output_dir,
    load_npz,
    locked_run,
    read_json,
    save_npz,
    write_json,
    write_run_metadata,
    write_text,
)
from peel.package import DEFAULT_WEIGHTING, DeployOptions
from peel.pretrain import PretrainConfig, load_embeddings, pretrain, save_result

log = logging.getLogger(__name__)

# The paper's 5/10/25 MB on Amazon-Book, as fractions of its full 128-d float32 item table.
PAPER_BUDGETS = ("0.107", "0.213", "0.533")


@dataclass(frozen=True)
class RunOptions:
    """What a run is about, as opposed to how each stage works."""

    data: str = "demo"  # dataset folder/file, or demo / demo:SEED
    label: str = "PEEL"  # method name in reports (ablations set their own)
    workers: int | None = None  # group fine-tuning processes; None = all cores
    seed: int = 2024


@dataclass(frozen=True)
class DeployConfig:
    """How packages are built and evaluated."""

    budgets: tuple[str, ...] = PAPER_BUDGETS
    selection: str = "importance"  # "random" = ablation "w/o Importance Weight"
    similarity: str | None = None  # None: the reading the groups were trained with
    weighting: str | None = None  # None: peel.package.DEFAULT_WEIGHTING
    scale: str | None = None  # Eq. 10 factor, "eq10" | "none"; None: what fine-tuning used
    baselines: tuple[str, ...] = ("pmf", "lightgcn")
    k: int = 50


@dataclass(frozen=True)
class RunConfig:
    run: RunOptions = field(default_factory=RunOptions)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    groups: GroupConfig = field(default_factory=GroupConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)

    def validate(self) -> None:
        self.pretrain.validate()
        self.groups.validate()
        self.finetune.validate()
        if self.pretrain.dim != self.finetune.dim:
            raise ValueError(
                f"pretrain.dim={self.pretrain.dim} but finetune uses n_blocks*block_dim="
                f"{self.finetune.n_blocks}*{self.finetune.block_dim}={self.finetune.dim};"
                " make them equal"
            )
        if self.deploy.selection not in SELECTIONS:
            raise ValueError(f"deploy.selection must be one of {SELECTIONS}")
        if self.deploy.scale is not None and self.deploy.scale not in SCALES:
            raise ValueError(f"deploy.scale must be one of {SCALES} (or left out)")

    def with_seed(self, seed: int) -> RunConfig:
        """One seed drives every stage (split, init, sampling, K-Means, fine-tuning)."""
        return replace(self, run=replace(self.run, seed=seed),
                       data=replace(self.data, seed=seed),
                       pretrain=replace(self.pretrain, seed=seed))


SECTIONS: dict[str, type] = {"run": RunOptions, "data": DataConfig, "pretrain": PretrainConfig,
                             "groups": GroupConfig, "finetune": FinetuneConfig,
                             "deploy": DeployConfig}


#: Configurations shipped with the library, usable by name: ``peel train DATA --config paper``.
SHIPPED_CONFIGS = ("paper",)


def shipped_config_path(name: str) -> Path:
    """The TOML file of a shipped configuration (``paper``: the method as the paper writes it)."""
    from importlib.resources import files

    return Path(str(files("peel") / "configs" / f"{name}.toml"))


def load_config(path: str | Path | None) -> RunConfig:
    """Read a TOML config (missing sections/keys take the library defaults); a shipped
    configuration's name (:data:`SHIPPED_CONFIGS`) stands for its file."""
    if path is None:
        return RunConfig()
    if str(path) in SHIPPED_CONFIGS and not Path(path).exists():
        path = shipped_config_path(str(path))
    doc = read_toml(path)
    where = str(path)
    check_sections(doc, set(SECTIONS), where)
    return RunConfig(**{name: section(doc, name, cls, where) for name, cls in SECTIONS.items()})


def config_toml(cfg: RunConfig) -> str:
    head = f"# peel {__version__}: resolved configuration of this run\n"
    return head + to_toml({name: getattr(cfg, name) for name in SECTIONS})


def load_run_config(run: str | Path) -> RunConfig:
    path = Path(run) / "config.toml"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a run folder (no config.toml); run `peel train`")
    return load_config(path)


def load_data(cfg: RunConfig) -> InteractionData:
    spec = cfg.run.data
    if spec == "demo" or spec.startswith("demo:"):
        from peel.synthetic import SyntheticConfig, make_demo

        seed = int(spec.split(":", 1)[1]) if ":" in spec else 0
        return make_demo(SyntheticConfig(seed=seed), cfg.data)
    return load_dataset(spec, cfg.data)


def fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


@contextmanager
def _timed(timings: dict[str, float], name: str, progress: bool) -> Iterator[None]:
    if progress:
        print(f"[peel] {name} ...", flush=True)
    t0 = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t0
    if progress:
        print(f"[peel] {name} done in {timings[name]:.1f}s", flush=True)


# ---------------------------------------------------------------------------------------------
# peel train
# ---------------------------------------------------------------------------------------------


@locked_run("out")  # one process per run folder; refuses a second `peel train` (RunLock)
def train(cfg: RunConfig, out: str | Path, progress: bool = True,
          data: InteractionData | None = None) -> dict[str, Any]:
    """Run (or resume) every server-side stage; returns the summary written to the run."""
    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_config(out, cfg)
    write_text(out / "config.toml", config_toml(cfg))
    write_run_metadata(out, "train", cfg, cfg.run.seed)
    timings: dict[str, float] = {}
    with _timed(timings, "data", progress):
        data = data if data is not None else load_data(cfg)
    with _timed(timings, "pretrain", progress):
        user_emb, item_emb = pretrain_stage(data, cfg, out, progress)
    with _timed(timings, "groups", progress):
        user_groups, item_groups = partition_stage(data, cfg, out, user_emb)
    with _timed(timings, "finetune", progress):
        from peel.executor import make_executor

        summaries = finetune_groups(data, user_emb, item_emb, user_groups, item_groups,
                                    cfg.finetune, out, make_executor(cfg.run.workers, progress),
                                    seed=cfg.run.seed)
    summary = {
        "peel_version": __version__,
        "dataset": data.stats(),
        "seconds": timings,
        "pretrain_seconds_all_sessions": _pretrain_seconds_all_sessions(out / "pretrain"),
        "user_group_sizes": np.bincount(user_groups).tolist(),
        "item_group_sizes": np.bincount(item_groups).tolist(),
        "groups": [_jsonable(s) for s in summaries],
    }
    write_json(out / "train_summary.json", summary)
    return summary


def _jsonable(obj: Any) -> Any:
    d = asdict(obj) if hasattr(obj, "__dataclass_fields__") else dict(obj)
    d.pop("history", None)
    return d


def _check_same_config(out: Path, cfg: RunConfig) -> None:
    """Resuming with different settings would mix stages made under different configs."""
    path = out / "config.toml"
    if not path.exists():
        return
    old = load_config(path)
    ignore_run = {"workers"}
    a = {k: v for k, v in asdict(old).items() if k != "deploy"}
    b = {k: v for k, v in asdict(cfg).items() if k != "deploy"}
    for d in (a, b):
        d["run"] = {k: v for k, v in d["run"].items() if k not in ignore_run}
    if json.loads(json.dumps(a, default=str)) != json.loads(json.dumps(b, default=str)):
        raise ValueError(f"{out}: this run folder was made with a different configuration;"
                         " use a new --out folder, or the same --config/--seed to resume")


def pretrain_stage(data: InteractionData, cfg: RunConfig, out: Path,
                   progress: bool) -> tuple[np.ndarray, np.ndarray]:
    stage = out / "pretrain"
    if (stage / "embeddings.safetensors").exists():
        _check_pretrain_config(stage, cfg.pretrain)
        log.info("pretrain: reusing %s", stage)
        return load_embeddings(stage)
    result = pretrain(data, cfg.pretrain, out_dir=stage / "checkpoint", progress=progress)
    save_result(result, stage)
    return result.user_emb, result.item_emb


def _pretrain_seconds_all_sessions(stage: Path) -> float | None:
    """Stage 1's training time summed over every resume; ``seconds`` only covers this call,
    which after an interruption (or with reused embeddings) understates what stage 1 cost."""
    path = stage / "pretrain_log.json"
    history = read_json(path).get("history", []) if path.exists() else []
    return float(history[-1]["elapsed"]) if history else None


def _check_pretrain_config(stage: Path, pcfg: PretrainConfig) -> None:
    """Stage-1 outputs are only reused when they were made with exactly this configuration."""
    path = stage / "pretrain_config.json"
    if not path.exists():
        raise ValueError(f"{path}: missing; these embeddings cannot be checked against the "
                         "configuration; delete the pretrain folder to retrain")
    saved = read_json(path)
    wanted = json.loads(json.dumps(asdict(pcfg), default=str))
    if saved != wanted:
        diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise ValueError(f"{path}: pretrained with different settings ({', '.join(diff)}); "
                         "use a new --out folder or the same [pretrain] settings")


def reuse_pretrain(source_run: str | Path, out: str | Path, cfg: RunConfig) -> None:
    """Copy stage 1 of another run into ``out`` when data and [pretrain] settings are identical.

    Ablations that change only later stages (item grouping, user clustering) then skip the
    most expensive stage instead of recomputing identical embeddings.
    """
    src = Path(source_run)
    src_cfg = load_config(src / "config.toml")
    same = (src_cfg.run.data == cfg.run.data and asdict(src_cfg.data) == asdict(cfg.data)
            and asdict(src_cfg.pretrain) == asdict(cfg.pretrain))
    if not same:
        raise ValueError(f"{src}: its data or [pretrain] settings differ from this run's; "
                         "stage 1 cannot be reused (drop --reuse-pretrain)")
    stage = src / "pretrain"
    _check_pretrain_config(stage, cfg.pretrain)
    dest = Path(out) / "pretrain"
    for name in ("embeddings.safetensors", "pretrain_log.json", "pretrain_config.json"):
        with atomic_path(dest / name) as tmp:
            shutil.copyfile(stage / name, tmp)


def partition_stage(data: InteractionData, cfg: RunConfig, out: Path,
                    user_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    path = out / "partition.npz"
    key = fingerprint(asdict(cfg.groups), cfg.run.seed, user_emb, data.item_popularity)
    if path.exists():
        saved = load_npz(path)
        if str(saved["fingerprint"]) == key:
            return saved["user_group"], saved["item_group"]
    user_groups = make_user_groups(user_emb, cfg.groups, cfg.run.seed)
    item_groups = make_item_groups(data.item_popularity, cfg.groups, cfg.run.seed)
    save_npz(path, {"user_group": user_groups, "item_group": item_groups,
                    "fingerprint": np.array(key)})
    return user_groups, item_groups


# ---------------------------------------------------------------------------------------------
# peel evaluate: what a device would see
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalRow:
    method: str
    budget: str
    budget_bytes: int
    bytes_used: int
    metrics: dict[str, float]
    detail: dict[str, Any] = field(default_factory=dict)


def full_table_bytes(data: InteractionData, dim: int) -> int:
    return data.n_items * dim * 4


def deploy_options(cfg: RunConfig) -> DeployOptions:
    """The run's own way of building packages: [deploy] settings, falling back to what its
    groups were fine-tuned with (similarity, Eq. 10 scale), then to the package defaults."""
    dcfg = cfg.deploy
    return DeployOptions(similarity=dcfg.similarity or cfg.finetune.similarity,
                         weighting=dcfg.weighting or DEFAULT_WEIGHTING,
                         scale=dcfg.scale or cfg.finetune.scale,
                         selection=dcfg.selection, seed=cfg.run.seed)


def evaluate_peel(run: str | Path, data: InteractionData, cfg: RunConfig,
                  budgets: Sequence[str], split: str = "test",
                  selection: str | None = None, scale: str | None = None,
                  per_user_out: dict[str, dict[str, np.ndarray]] | None = None
                  ) -> list[EvalRow]:
    """Deploy every user group at every budget and rank its users with the device runtime.

    ``selection`` / ``scale`` override the run's block selection / Eq. 10 factor; rows made
    with an override are labelled with it, e.g. "PEEL (scale=eq10)". ``per_user_out``, when
    given, receives each budget's per-user metrics and user ids (for paired tests).

    Packages are built once at the largest budget and shrunk on the "device" for the others,
    which the property tests show is identical to building each budget directly.
    """
    import tempfile

    from peel.budget import parse_budget
    from peel.device import open_package
    from peel.eval import metrics_from_topk
    from peel.package import build_package, group_files, load_group

    full = full_table_bytes(data, cfg.pretrain.dim)
    sized = sorted(((parse_budget(b, full), b) for b in budgets), reverse=True)
    truth, seen = data.split_matrix(split), data.seen_matrix(split)
    own = deploy_options(cfg)
    options = replace(own, scale=scale or own.scale, selection=selection or own.selection)
    per_user: dict[str, dict[str, list[np.ndarray]]] = {b: {} for _, b in sized}
    evaluated: list[np.ndarray] = []
    used: dict[str, int] = {b: 0 for _, b in sized}
    with tempfile.TemporaryDirectory() as tmp:
        for g, _ in group_files(run):
            arrays = load_group(run, g)
            users = arrays.users
            has_truth = truth.getnnz(axis=1)[users] > 0
            if not has_truth.any():
                continue
            users, vectors = users[has_truth], arrays.user_emb[has_truth]
            rows = seen[users]
            evaluated.append(users)
            path = Path(tmp) / f"g{g}.peel"
            build_package(path, arrays, sized[0][0], group=g, options=options)
            package = open_package(path)
            for nbytes, label in sized:
                pkg = package.shrink(nbytes) if nbytes < sized[0][0] else package
                used[label] = max(used[label], pkg.report.total)
                ranked = pkg.rank_batch(vectors, k=cfg.deploy.k, exclude_indptr=rows.indptr,
                                        exclude_indices=rows.indices)
                metrics = metrics_from_topk(_valid_topk(ranked), users, truth, (20, 50))
                for key, value in metrics.items():
                    per_user[label].setdefault(key, []).append(value)
    if per_user_out is not None:
        for _, label in sized:
            per_user_out[label] = {k: np.concatenate(v) for k, v in per_user[label].items()}
            per_user_out[label]["users"] = np.concatenate(evaluated)
    changed = [f"{name}={value}" for name, value, default in
               (("selection", selection, own.selection), ("scale", scale, own.scale))
               if value not in (None, default)]
    method = f"{cfg.run.label} ({', '.join(changed)})" if changed else cfg.run.label
    return [EvalRow(method, label, nbytes, used[label],
                    {k: float(np.concatenate(v).mean()) for k, v in per_user[label].items()},
                    {"users": int(sum(len(x) for x in per_user[label]["recall@20"]))})
            for nbytes, label in sized]


def _valid_topk(ranked: Any) -> np.ndarray:
    """Rows shorter than K are padded with -1 by the runtime; point them at no item."""
    items = np.asarray(ranked.items)
    if (items < 0).any():
        items = items.copy()
        items[items < 0] = np.iinfo(np.int64).max // 2
    return items


def evaluate_baselines(data: InteractionData, cfg: RunConfig, budgets: Sequence[str],
                       progress: bool = True) -> list[EvalRow]:
    from peel.baselines import train_baseline
    from peel.budget import parse_budget

    full = full_table_bytes(data, cfg.pretrain.dim)
    rows = []
    for method in cfg.deploy.baselines:
        for label in budgets:
            nbytes = parse_budget(label, full)
            if progress:
                print(f"[peel] baseline {method} at {label} ...", flush=True)
            res = train_baseline(data, method, nbytes, cfg.pretrain, progress=progress)
            rows.append(EvalRow(_baseline_name(method), label, nbytes, res.bytes_used, res.test,
                                {"dim": res.dim, "best_epoch": res.best_epoch,
                                 "seconds": res.seconds}))
    return rows


def _baseline_name(method: str) -> str:
    return {"pmf": "PMF", "lightgcn": "LightGCN"}.get(method, method)


def evaluate(run: str | Path, budgets: Sequence[str] | None = None, baselines: bool = False,
             selections: Sequence[str] = (), scales: Sequence[str] = (),
             progress: bool = True) -> list[EvalRow]:
    """`peel evaluate`: PEEL through the device runtime (+ optional baselines), saved to
    RUN/eval.json merged with any earlier rows for other methods/budgets."""
    cfg = load_run_config(run)
    check_output_dir(run, "run folder")  # eval.json is written last: fail before the work
    budgets = list(budgets or cfg.deploy.budgets)
    data = load_data(cfg)
    rows = evaluate_peel(run, data, cfg, budgets)
    for sel in selections:
        rows += evaluate_peel(run, data, cfg, budgets, selection=sel)
    for scale in scales:
        rows += evaluate_peel(run, data, cfg, budgets, scale=scale)
    if baselines:
        rows += evaluate_baselines(data, cfg, budgets, progress)
    _save_rows(Path(run) / "eval.json", rows, data, cfg)
    return rows


def _save_rows(path: Path, rows: list[EvalRow], data: InteractionData, cfg: RunConfig) -> None:
    old = read_json(path)["rows"] if path.exists() else []
    new = [asdict(r) for r in rows]
    keys = {(r["method"], r["budget"]) for r in new}
    merged = [r for r in old if (r["method"], r["budget"]) not in keys] + new
    write_json(path, {"peel_version": __version__, "dataset": data.name,
                      "n_items": data.n_items, "full_dim": cfg.pretrain.dim,
                      "full_table_bytes": full_table_bytes(data, cfg.pretrain.dim),
                      "rows": merged})


def demo_config(seed: int = 0) -> RunConfig:
    """A run sized for the built-in demo data (2,000 users, ~1,500 items), a few minutes on
    two cores: the paper's architecture (N=16 blocks of d=8) with fewer groups and epochs."""
    return RunConfig(
        run=RunOptions(data=f"demo:{seed}", label="PEEL", seed=seed),
        data=DataConfig(seed=seed),
        pretrain=PretrainConfig(epochs=60, batch_size=4096, lr=5e-3, patience=5,
                                diversity=0.1, seed=seed),
        groups=GroupConfig(n_user_groups=6, n_item_groups=10),
        finetune=FinetuneConfig(max_epochs=15, patience=3),
        deploy=DeployConfig(budgets=PAPER_BUDGETS, baselines=("pmf", "lightgcn")),
    )
