"""The whole method as one resumable run: data -> pretrain -> groups -> fine-tune -> evaluate.

A run folder holds everything needed to continue, evaluate or report it:

    RUN/config.toml            resolved configuration (every hyper-parameter)
    RUN/run.json               library version, command, seed, config
    RUN/data.json              what the run was trained on (file and split hashes), verified
                               by every later command; RUN/data.npz when given in memory
    RUN/pretrain/              stage 1 outputs (+ checkpoint/ while training)
    RUN/partition.npz          user group of every user, item group of every item
    RUN/groups/group_NNN.*     stage 2 outputs per user group
    RUN/train_summary.json     seconds per stage, group sizes
    RUN/eval.json              metrics per method and budget (from `peel evaluate`)

Each stage is skipped when its outputs exist and were made with the same configuration, so an
interrupted `peel train` re-run with the same arguments resumes where it stopped. The file
layout itself belongs to :mod:`peel.runfolder`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from peel import __version__, runfolder
from peel.budget import (
    PRECISIONS,
    SCALES,
    SELECTIONS,
    SIMILARITIES,
    WEIGHTINGS,
    full_table_bytes,
)
from peel.config import check_sections, read_toml, section, to_toml
from peel.data import DataConfig, InteractionData, detect_format, load_dataset
from peel.elastic import FinetuneConfig, finetune_groups
from peel.errors import ConfigError
from peel.executor import Executor
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
from peel.package import (
    DEFAULT_WEIGHTING,
    PRECISION_CHOICES,
    DeployOptions,
    resolve_precision,
)
from peel.pretrain import (
    RESUMABLE_FIELDS,
    PretrainConfig,
    load_embeddings,
    pretrain,
    save_result,
)

log = logging.getLogger(__name__)

# The paper's 5/10/25 MB on Amazon-Book, as fractions of its full 128-d float32 item table.
PAPER_BUDGETS = ("0.107", "0.213", "0.533")
#: The rules a run's "auto" chooses among (peel.autoprecision), the fixed default first:
#: 4-bit blocks with refinements at a quarter / none / half / all of their block's weight, and
#: int8 blocks (docs/paper-notes.md, "A precision rule chosen by each run").
DEFAULT_CANDIDATES = ("int4r25", "int4r0", "int4r50", "int4r100", "int8s")


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
    baselines: tuple[str, ...] = ("pmf", "lightgcn", "lightgcn-svd")
    k: int = 50  # ranked list length; metrics at the cutoffs 20, 50 and k that are <= k
    # how kept blocks are stored: "auto" (peel.package.DEFAULT_PRECISION, chosen on
    # validation), "fp32" (the format-v3 packages of before), "fp16", "int8", "int8o", "int4"
    # (4-bit, format v5), "int8s" / "int4s" (row scales shared by an item's blocks, v6), "value",
    # "int4r0" / "int4r25" / "int4r50" / "int4r100" (4-bit blocks and 4-bit refinements, v7)
    precision: str = "auto"
    # the rules "auto" chooses among on the run's validation split at the end of `peel train`
    # (peel.autoprecision; the first wins ties); empty = "auto" is always DEFAULT_PRECISION
    precision_candidates: tuple[str, ...] = DEFAULT_CANDIDATES


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
        if self.deploy.similarity is not None and self.deploy.similarity not in SIMILARITIES:
            raise ValueError(f"deploy.similarity must be one of {SIMILARITIES} (or left out)")
        if self.deploy.weighting is not None and self.deploy.weighting not in WEIGHTINGS:
            raise ValueError(f"deploy.weighting must be one of {WEIGHTINGS} (or left out)")
        if self.deploy.precision not in PRECISION_CHOICES:
            raise ValueError(f"deploy.precision must be one of {PRECISION_CHOICES}")
        bad = [r for r in self.deploy.precision_candidates if r not in PRECISIONS]
        if bad or len(set(self.deploy.precision_candidates)) \
                != len(self.deploy.precision_candidates):
            raise ValueError(f"deploy.precision_candidates {list(self.deploy.precision_candidates)}"
                             f": each once, each one of {', '.join(PRECISIONS)} (or [] to "
                             "keep auto fixed)")
        if isinstance(self.deploy.k, bool) or not isinstance(self.deploy.k, int) \
                or self.deploy.k < 1:
            raise ValueError(f"deploy.k must be a positive integer, got {self.deploy.k!r}")
        from peel.baselines import check_names

        check_names(self.deploy.baselines, "deploy.baselines")

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
    return load_config(runfolder.require_run(run) / runfolder.CONFIG_FILE)


def is_demo(spec: str) -> bool:
    return spec == "demo" or spec.startswith("demo:")


def resolve_data(spec: str, cfg: DataConfig | None = None,
                 cache_dir: str | Path | bool | None = None) -> InteractionData:
    """``demo`` / ``demo:SEED`` is the built-in synthetic data; anything else is a path
    (``cache_dir`` as in :func:`peel.data.load_dataset`)."""
    cfg = cfg or DataConfig()
    if is_demo(spec):
        from peel.synthetic import SyntheticConfig, make_demo

        return make_demo(SyntheticConfig(seed=_demo_seed(spec)), cfg)
    return load_dataset(spec, cfg, cache_dir=cache_dir)


def _demo_seed(spec: str) -> int:
    """The SEED of ``demo:SEED``: a non-negative integer, or a one-line error saying so."""
    raw = spec.split(":", 1)[1] if ":" in spec else "0"
    if not (raw.isascii() and raw.isdigit()) or int(raw) >= 2**63:
        raise ConfigError(f"data {spec!r}: the demo seed must be a non-negative integer below "
                          f"2^63, e.g. demo:0")
    return int(raw)


def load_data(cfg: RunConfig) -> InteractionData:
    """The data ``cfg.run.data`` names (not verified against a run: see :func:`run_data`)."""
    if cfg.run.data == runfolder.STORED:
        raise ValueError("this run's data was given in memory and is stored in the run folder;"
                         " read it with run_data(run) (or peel.Run.load(run).data)")
    return resolve_data(cfg.run.data, cfg.data)


def source_files(cfg: RunConfig) -> list[Path]:
    """The files ``cfg.run.data`` reads (none for demo or stored data)."""
    spec = cfg.run.data
    if is_demo(spec) or spec == runfolder.STORED:
        return []
    from peel.data import _input_files

    path = Path(spec)
    fmt = cfg.data.fmt if cfg.data.fmt != "auto" else detect_format(path)
    return _input_files(path, fmt)


def run_data(run: str | Path, cfg: RunConfig | None = None) -> InteractionData:
    """The dataset a run was trained on, verified against RUN/data.json: data files that
    changed since training are refused before they are read, and so is a different split."""
    cfg = cfg or load_run_config(run)
    record = runfolder.read_record(run)
    if record is None:
        log.warning("%s: no %s (made before runs pinned their data); the data is not checked",
                    run, runfolder.DATA_RECORD)
    return _verified_data(run, cfg, record)


def _verified_data(run: str | Path, cfg: RunConfig, record: runfolder.DataRecord | None,
                   given: InteractionData | None = None) -> InteractionData:
    """``given``, the run's stored data or the configured files, checked against ``record``:
    changed files are refused before they are read, a different split after."""
    if given is not None:
        data = given
    elif cfg.run.data == runfolder.STORED:
        data = runfolder.load_stored_data(run)
    else:
        if record is not None:
            runfolder.verify_files(run, record)
        data = load_data(cfg)
    if record is not None:
        runfolder.verify_split(run, record, data)
    return data


def _training_data(out: Path, cfg: RunConfig, given: InteractionData | None) -> InteractionData:
    """The data to train on, pinned in the run folder the first time and verified on resume."""
    record = runfolder.read_record(out)
    data = _verified_data(out, cfg, record, given)
    if record is not None:
        return data
    if given is not None:
        runfolder.store_data(out, data)
    runfolder.record_data(out, cfg.run.data, data, source_files(cfg))
    return data


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
          data: InteractionData | None = None, executor: Executor | None = None
          ) -> dict[str, Any]:
    """Run (or resume) every server-side stage; returns the summary written to the run.

    ``data`` given in memory is saved into the run (RUN/data.npz) and the run's ``run.data``
    becomes "stored", so evaluation and deployment use exactly these splits later.
    ``executor`` runs the group fine-tuning tasks (default: ``run.workers`` local processes;
    a :class:`peel.executor.RayExecutor` runs them on Ray); results do not depend on it.
    """
    if data is not None:
        cfg = replace(cfg, run=replace(cfg.run, data=runfolder.STORED))
    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_config(out, cfg)
    write_text(out / runfolder.CONFIG_FILE, config_toml(cfg))
    write_run_metadata(out, "train", cfg, cfg.run.seed)
    timings: dict[str, float] = {}
    with _timed(timings, "data", progress):
        data = _training_data(out, cfg, data)
    from peel.executor import make_executor

    with _timed(timings, "pretrain", progress):
        # stage-1 trials ([pretrain] trials > 1) run side by side on the run's workers
        user_emb, item_emb = pretrain_stage(
            data, cfg, out, progress,
            (executor or make_executor(cfg.run.workers, progress, desc="stage-1 trials"))
            if cfg.pretrain.trials > 1 else None)
    with _timed(timings, "groups", progress):
        user_groups, item_groups = partition_stage(data, cfg, out, user_emb)
    with _timed(timings, "finetune", progress):
        summaries = finetune_groups(data, user_emb, item_emb, user_groups, item_groups,
                                    cfg.finetune, out,
                                    executor or make_executor(cfg.run.workers, progress),
                                    seed=cfg.run.seed)
    with _timed(timings, "precision", progress):
        from peel.autoprecision import precision_stage

        precision = precision_stage(out, data, cfg, progress)
    summary = {
        "peel_version": __version__,
        "dataset": data.stats(),
        "seconds": timings,
        "pretrain_seconds_all_sessions": _pretrain_seconds_all_sessions(out / "pretrain"),
        "user_group_sizes": np.bincount(user_groups).tolist(),
        "item_group_sizes": np.bincount(item_groups).tolist(),
        "groups": [_jsonable(s) for s in summaries],
        "precision": precision,
    }
    write_json(out / "train_summary.json", summary)
    return summary


def _jsonable(obj: Any) -> Any:
    d = asdict(obj) if hasattr(obj, "__dataclass_fields__") else dict(obj)
    d.pop("history", None)
    return d


def _check_same_config(out: Path, cfg: RunConfig) -> None:
    """Resuming with different settings would mix stages made under different configs; how
    long stage 1 may run (epoch and wall-clock caps, patience) and the worker count may change."""
    path = out / "config.toml"
    if not path.exists():
        return
    old = load_config(path)
    ignore = {"run": {"workers"}, "pretrain": RESUMABLE_FIELDS}
    a = {k: v for k, v in asdict(old).items() if k != "deploy"}
    b = {k: v for k, v in asdict(cfg).items() if k != "deploy"}
    for d in (a, b):
        for part, names in ignore.items():
            d[part] = {k: v for k, v in d[part].items() if k not in names}
    if json.loads(json.dumps(a, default=str)) != json.loads(json.dumps(b, default=str)):
        raise ValueError(f"{out}: this run folder was made with a different configuration;"
                         " train into a new folder, or use the same configuration and seed to"
                         " resume")


def pretrain_stage(data: InteractionData, cfg: RunConfig, out: Path, progress: bool,
                   executor: Executor | None = None) -> tuple[np.ndarray, np.ndarray]:
    from peel.tuning import tune_stage1

    stage = out / "pretrain"
    if (stage / "embeddings.safetensors").exists():
        _check_pretrain_config(stage, cfg.pretrain)
        log.info("pretrain: reusing %s", stage)
        return load_embeddings(stage)
    if cfg.pretrain.trials > 1:
        tune_stage1(data, cfg.pretrain, stage, progress, executor)
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
    """Stage-1 outputs are only reused when they were made with this configuration (with
    ``[pretrain] trials`` > 1: the chosen trial's); finished embeddings are reused as they are
    whatever epoch or wall-clock cap is asked now."""
    from peel.pretrain import check_saved_config
    from peel.tuning import chosen_stage1_config

    check_saved_config(stage, chosen_stage1_config(pcfg, stage))


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
                         "stage 1 cannot be reused (do not reuse its pretraining)")
    stage = src / "pretrain"
    _check_pretrain_config(stage, cfg.pretrain)
    dest = Path(out) / "pretrain"
    names = ["embeddings.safetensors", "pretrain_log.json", "pretrain_config.json"]
    if cfg.pretrain.trials > 1:
        names.append("tuning.json")
    for name in names:
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


def deploy_options(cfg: RunConfig, run: str | Path | None = None) -> DeployOptions:
    """The run's own way of building packages: [deploy] settings, falling back to what its
    groups were fine-tuned with (similarity, Eq. 10 scale), then to the package defaults.
    A precision of "auto" is the rule the run chose on its validation split (RUN/precision.json,
    :mod:`peel.autoprecision`) when ``run`` is given and has chosen one.

    The one place that resolves them: ``peel deploy``, ``peel evaluate``, the Python API and
    the benchmarks all build packages with these options, so what is deployed is what was
    measured.
    """
    dcfg = cfg.deploy
    precision = run_precision(dcfg.precision, run)
    return DeployOptions(similarity=dcfg.similarity or cfg.finetune.similarity,
                         weighting=dcfg.weighting or DEFAULT_WEIGHTING,
                         scale=dcfg.scale or cfg.finetune.scale,
                         selection=dcfg.selection, seed=cfg.run.seed,
                         precision=precision)


def run_precision(precision: str | None, run: str | Path | None) -> str | None:
    """``precision`` with "auto" read as the rule ``run`` chose on its validation split (kept
    as "auto", i.e. :data:`peel.package.DEFAULT_PRECISION`, when the run chose none)."""
    if precision == "auto" and run is not None:
        return runfolder.chosen_precision(run) or precision
    return precision


def with_overrides(options: DeployOptions, **changes: Any) -> DeployOptions:
    """``options`` with the given (non-None) settings replaced."""
    return replace(options, **{k: v for k, v in changes.items() if v is not None})


def ranking_k(cfg: RunConfig, data: InteractionData) -> int:
    """Length of ranked lists: ``[deploy] k``, capped at the catalogue size."""
    return min(cfg.deploy.k, data.n_items)


@dataclass(frozen=True)
class GroupRanking:
    """The device's top-k lists of one user group's evaluated users at one budget."""

    budget: str
    group: int
    users: np.ndarray
    items: np.ndarray  # (len(users), k); -1 pads rows with fewer rankable items
    bytes_used: int
    blocks: tuple[int, ...] = ()  # blocks the package keeps for each item group


def peel_rankings(run: str | Path, data: InteractionData, cfg: RunConfig,
                  budgets: Sequence[str], split: str = "test",
                  options: DeployOptions | None = None) -> Iterator[GroupRanking]:
    """Deploy every user group at every budget and rank its users with the device runtime.

    Packages are built once at the largest budget and shrunk on the "device" for the others,
    which the property tests show is identical to building each budget directly. Users are
    ranked with the same options, k and exclusions (train, plus valid for test) as a one-user
    package from ``peel deploy --user`` ranks them.
    """
    import tempfile

    from peel.budget import parse_budget
    from peel.device import open_package
    from peel.package import build_package

    full = full_table_bytes(data.n_items, cfg.pretrain.dim)
    sized = sorted(((parse_budget(b, full), b) for b in budgets), reverse=True)
    truth, seen = data.split_matrix(split), data.seen_matrix(split)
    options = options or deploy_options(cfg, run)
    k = ranking_k(cfg, data)
    with tempfile.TemporaryDirectory() as tmp:
        for g, _ in runfolder.group_files(run):
            arrays = runfolder.load_group(run, g)
            has_truth = truth.getnnz(axis=1)[arrays.users] > 0
            if not has_truth.any():
                continue
            users, vectors = arrays.users[has_truth], arrays.user_emb[has_truth]
            rows = seen[users]
            path = Path(tmp) / f"g{g}.peel"
            build_package(path, arrays, sized[0][0], group=g, options=options)
            package = open_package(path)
            for nbytes, label in sized:
                pkg = package.shrink(nbytes) if nbytes < sized[0][0] else package
                ranked = pkg.rank_batch(vectors, k=k, exclude_indptr=rows.indptr,
                                        exclude_indices=rows.indices)
                yield GroupRanking(label, g, users, np.asarray(ranked.items),
                                   pkg.report.total, tuple(len(b) for b in pkg.block_sets()))


def evaluate_peel(run: str | Path, data: InteractionData, cfg: RunConfig,
                  budgets: Sequence[str], split: str = "test",
                  selection: str | None = None, scale: str | None = None,
                  per_user_out: dict[str, dict[str, np.ndarray]] | None = None,
                  precision: str | None = None) -> list[EvalRow]:
    """PEEL's figures: metrics of :func:`peel_rankings` at the cutoffs <= ``[deploy] k``.

    ``selection`` / ``scale`` / ``precision`` override the run's block selection / Eq. 10
    factor / block storage; rows made with an override are labelled with it, e.g.
    "PEEL (scale=eq10)". ``per_user_out``, when given, receives each budget's per-user metrics
    and user ids (for paired tests). Each row's ``detail["blocks_per_item_group"]`` maps every
    user group to the number of blocks its package keeps for each item group at that budget.
    """
    from peel.budget import parse_budget
    from peel.eval import metric_cutoffs, metrics_from_topk

    own = deploy_options(cfg, run)
    precision = run_precision(precision, run)
    options = with_overrides(own, selection=selection, scale=scale, precision=precision)
    ks = metric_cutoffs(ranking_k(cfg, data))
    truth = data.split_matrix(split)
    per_user: dict[str, dict[str, list[np.ndarray]]] = {b: {} for b in budgets}
    used: dict[str, int] = {b: 0 for b in budgets}
    n_users: dict[str, int] = {b: 0 for b in budgets}
    order: dict[str, list[np.ndarray]] = {b: [] for b in budgets}  # users, as ranked
    blocks: dict[str, dict[str, list[int]]] = {b: {} for b in budgets}
    for ranked in peel_rankings(run, data, cfg, budgets, split, options):
        used[ranked.budget] = max(used[ranked.budget], ranked.bytes_used)
        blocks[ranked.budget][str(ranked.group)] = list(ranked.blocks)
        n_users[ranked.budget] += len(ranked.users)
        metrics = metrics_from_topk(_valid_topk(ranked.items), ranked.users, truth, ks)
        for key, value in metrics.items():
            per_user[ranked.budget].setdefault(key, []).append(value)
        order[ranked.budget].append(ranked.users)
    if per_user_out is not None:
        for label, parts in per_user.items():
            per_user_out[label] = {key: np.concatenate(v) for key, v in parts.items()}
            per_user_out[label]["users"] = np.concatenate(order[label])
    changed = [f"{name}={value}" for name, value, default in
               (("selection", selection, own.selection), ("scale", scale, own.scale),
                ("precision", precision, own.precision))
               if value not in (None, default)]
    method = f"{cfg.run.label} ({', '.join(changed)})" if changed else cfg.run.label
    full = full_table_bytes(data.n_items, cfg.pretrain.dim)
    sized = sorted(((parse_budget(b, full), b) for b in budgets), reverse=True)
    return [EvalRow(method, label, nbytes, used[label],
                    {k: float(np.concatenate(v).mean()) for k, v in per_user[label].items()},
                    {"users": n_users[label], "blocks_per_item_group": blocks[label],
                     "precision": resolve_precision(options.precision)})
            for nbytes, label in sized]


#: Budget label of the reference rows: every block kept / the whole pretrained model.
EVERY_BLOCK = "all"


def reference_rows(run: str | Path, data: InteractionData, cfg: RunConfig,
                   split: str = "test") -> list[EvalRow]:
    """What PEEL is measured against at no budget: its packages with every block kept, and
    the run's pretrained model (every dimension, dot product). Both are labelled budget
    "all"; its bytes are the larger of the two footprints, so each row fits its "budget"."""
    from peel.eval import dot_scorer, metric_cutoffs
    from peel.eval import evaluate as evaluate_scorer

    full = full_table_bytes(data.n_items, cfg.pretrain.dim)
    every = evaluate_peel(run, data, cfg, [str(2 * full + 10**6)], split)[0]
    user_emb, item_emb = load_embeddings(Path(run) / "pretrain")
    res = evaluate_scorer(dot_scorer(user_emb, item_emb), data, split,
                          ks=metric_cutoffs(ranking_k(cfg, data)))
    dim = int(item_emb.shape[1])
    pretrained_bytes = (data.n_items + 1) * dim * 4
    nbytes = max(every.bytes_used, pretrained_bytes)
    return [EvalRow(f"{cfg.run.label} (every block)", EVERY_BLOCK, nbytes, every.bytes_used,
                    every.metrics, every.detail),
            EvalRow(f"pretrained ({dim}-d)", EVERY_BLOCK, nbytes, pretrained_bytes,
                    res.metrics, {"dim": dim, "users": len(res.users)})]


def _valid_topk(items: np.ndarray) -> np.ndarray:
    """Rows shorter than K are padded with -1 by the runtime; point them at no item."""
    items = np.asarray(items)
    if (items < 0).any():
        items = items.copy()
        items[items < 0] = np.iinfo(np.int64).max // 2
    return items


def evaluate_baselines(data: InteractionData, cfg: RunConfig, budgets: Sequence[str],
                       progress: bool = True, methods: Sequence[str] | None = None,
                       run: str | Path | None = None, split: str = "test",
                       tune_trials: int = 0, executor: Executor | None = None
                       ) -> list[EvalRow]:
    """Fixed-size baselines at every budget, each through the shared
    :class:`peel.baselines.BudgetedRecommender` interface and PEEL's metrics.

    ``lightgcn-svd`` reuses the run's stage-1 embeddings when ``run`` is given (it needs no
    training at any budget); without a run it pretrains first. ``tune_trials`` > 0 tunes every
    method at every budget on the validation split with that many trials
    (:func:`peel.tuning.tune`); the chosen setting and every trial go into the row's
    ``detail["tuning"]``. 0 fits the configured setting only. Without ``executor`` the
    methods run here one after another (one model per method, refitted per budget); with
    one, every method x budget is a task (e.g. a Ray task) and the data and the run's
    pretrained tables are sent once. Rows are the same either way, in the same order.
    """
    from peel.baselines import REGISTRY, from_stage1_tables, make_baseline
    from peel.budget import parse_budget
    from peel.eval import metric_cutoffs

    if isinstance(tune_trials, bool) or not isinstance(tune_trials, int) or tune_trials < 0:
        raise ValueError(f"tune_trials must be an integer >= 0, got {tune_trials!r}")
    full = full_table_bytes(data.n_items, cfg.pretrain.dim)
    ks = tuple(metric_cutoffs(ranking_k(cfg, data)))
    names = list(cfg.deploy.baselines if methods is None else methods)
    if executor is not None:
        tasks = [BaselineTask(m, label, parse_budget(label, full), tune_trials, cfg.run.seed)
                 for m in names for label in budgets]
        shared = BaselineShared(data, cfg.pretrain, split, ks,
                                _pretrained(run) if any(map(from_stage1_tables, names)) else None)
        if tune_trials:
            return _tuned_rows(executor, tasks, shared)
        return executor.map(baseline_row, tasks, labels=[f"{t.method}@{t.budget}"
                                                         for t in tasks], shared=shared)
    rows = []
    for method in names:
        model = make_baseline(method, cfg.pretrain, run=run)
        same = None if REGISTRY[method].search_space else (lambda _cfg, m=model: m)
        for label in budgets:
            nbytes = parse_budget(label, full)
            if progress:
                print(f"[peel] baseline {method} at {label}"
                      + (f", {tune_trials} validation trials" if tune_trials else "") + " ...",
                      flush=True)
            model, row = _fit_row(model, data, label, nbytes, split, ks, tune_trials,
                                  cfg.run.seed, cfg.pretrain, run=run, make=same)
            rows.append(row)
    return rows


@dataclass(frozen=True)
class BaselineTask:
    """One baseline at one budget: the unit a distributed executor runs."""

    method: str
    budget: str
    budget_bytes: int
    tune_trials: int = 0
    seed: int = 0


@dataclass(frozen=True)
class BaselineShared:
    """What every baseline task reads; sent once per executor call, not once per task."""

    data: InteractionData
    config: Any  # PretrainConfig
    split: str
    ks: tuple[int, ...]
    pretrained: tuple[np.ndarray, np.ndarray] | None  # the run's stage 1 (lightgcn-svd)


@dataclass(frozen=True)
class TrialTask:
    """One tuning trial of one baseline at one budget: with an executor, the trials of every
    method and budget run side by side instead of one cell's trials after another."""

    cell: BaselineTask
    index: int
    setting: tuple[tuple[str, Any], ...]


def _tuned_rows(executor: Executor, cells: list[BaselineTask],
                shared: BaselineShared) -> list[EvalRow]:
    """Every cell's trials through ``executor``; per cell the validation choice
    (:func:`peel.tuning.choose`, as :func:`peel.tuning.tune`), then that model on the split."""
    from peel.baselines import REGISTRY
    from peel.eval import evaluate as evaluate_scorer
    from peel.tuning import choose, draw_trials

    if shared.data.valid.nnz == 0:
        raise ValueError("tuning baselines: the data has no validation split to choose on")
    tasks = [TrialTask(cell, index, tuple(sorted(setting.items())))
             for cell in cells
             for index, setting in enumerate(draw_trials(
                 cell.method, REGISTRY[cell.method].search_space, shared.config,
                 cell.tune_trials, cell.seed))]
    fitted = executor.map(trial_fit, tasks, shared=shared, labels=[
        f"{t.cell.method}@{t.cell.budget}#{t.index}" for t in tasks])
    rows = []
    for cell in cells:
        mine = [pair for task, pair in zip(tasks, fitted, strict=True) if task.cell == cell]
        model, _ = choose(cell.method, mine, cell.tune_trials, cell.seed)
        metrics = evaluate_scorer(model.scorer(), shared.data, shared.split,
                                  ks=shared.ks).metrics
        rows.append(EvalRow(model.label, cell.budget, cell.budget_bytes, model.bytes_used,
                            metrics, dict(model.params)))
    return rows


def trial_fit(task: TrialTask, shared: BaselineShared) -> tuple[Any, dict[str, Any]]:
    """Fit one tuning trial and score it on validation (an executor's task)."""
    from peel.tuning import fit_trial

    return fit_trial(task.cell.method, shared.data, task.cell.budget_bytes, shared.config,
                     task.index, dict(task.setting), _builder(task.cell.method, shared))


def _pretrained(run: str | Path | None) -> tuple[np.ndarray, np.ndarray] | None:
    return load_embeddings(Path(run) / "pretrain") if run is not None else None


def _builder(method: str, shared: BaselineShared) -> Callable[[Any], Any]:
    """``cfg -> fresh model`` of ``method`` in an executor's worker."""
    from peel.baselines import REGISTRY, from_stage1_tables, make_baseline

    def build(cfg: Any) -> Any:
        if from_stage1_tables(method) and shared.pretrained is not None:
            return REGISTRY[method].from_embeddings(*shared.pretrained, cfg)
        return make_baseline(method, cfg)

    return build


def baseline_row(task: BaselineTask, shared: BaselineShared) -> EvalRow:
    """Fit (or tune) one baseline at one budget and score it (an executor's task)."""
    from peel.baselines import REGISTRY

    build = _builder(task.method, shared)
    model = build(shared.config)
    same = None if REGISTRY[task.method].search_space else (lambda _cfg: model)
    return _fit_row(model, shared.data, task.budget, task.budget_bytes, shared.split,
                    shared.ks, task.tune_trials, task.seed, shared.config,
                    make=same or build)[1]


def _fit_row(model: Any, data: InteractionData, label: str, nbytes: int, split: str,
             ks: Sequence[int], tune_trials: int = 0, seed: int = 0, base: Any = None,
             run: str | Path | None = None, make: Any = None) -> tuple[Any, EvalRow]:
    """Fit ``model`` at ``nbytes`` (or, with ``tune_trials``, the best of that many
    validation trials of its method) and score it on ``split``."""
    from peel.eval import evaluate as evaluate_scorer
    from peel.tuning import tune

    if tune_trials:
        model, _ = tune(model.name, data, nbytes, base, tune_trials, seed=seed, run=run,
                        make=make)
    else:
        model.fit(data, nbytes)
    metrics = evaluate_scorer(model.scorer(), data, split, ks=ks).metrics
    return model, EvalRow(model.label, label, nbytes, model.bytes_used, metrics,
                          dict(model.params))


def evaluate(run: str | Path, budgets: Sequence[str] | None = None,
             baselines: bool | Sequence[str] = False, selections: Sequence[str] = (),
             scales: Sequence[str] = (), progress: bool = True, split: str = "test",
             partial: bool = False, tune_trials: int = 0, reference: bool = False,
             executor: Executor | None = None, precisions: Sequence[str] = (),
             peel: bool = True) -> list[EvalRow]:
    """`peel evaluate`: PEEL through the device runtime (+ optional baselines).

    ``baselines``: True for the run's ``[deploy] baselines``, or a list of method names;
    ``selections`` / ``scales`` / ``precisions`` add PEEL rows built with those settings;
    ``tune_trials``: validation trials per baseline and budget (0: no tuning);
    ``reference``: also the every-block and pretrained-model rows (:func:`reference_rows`);
    ``executor`` runs the baselines as one task per method x budget
    (see :func:`evaluate_baselines`);
    ``peel=False``: the baselines alone, which need only the run's data and config (not its
    group files), e.g. to tune them on another machine and merge the rows afterwards.
    Test-split rows are saved to RUN/eval.json merged with earlier rows for other
    methods/budgets; validation rows (``split="valid"``, for choosing settings) are only
    returned. An incomplete run is refused unless ``partial``, whose rows are marked partial.
    """
    if not peel and (selections or scales or precisions or reference or not baselines):
        raise ValueError("baselines only: leave out selections, scales, precisions and "
                         "reference (they are PEEL rows) and name the baselines")
    missing = runfolder.check_complete(run, partial) if peel else []
    cfg = load_run_config(run)
    check_output_dir(run, "run folder")  # eval.json is written last: fail before the work
    budgets = list(budgets or cfg.deploy.budgets)
    data = run_data(run, cfg)
    rows = evaluate_peel(run, data, cfg, budgets, split) if peel else []
    for sel in selections:
        rows += evaluate_peel(run, data, cfg, budgets, split, selection=sel)
    for scale in scales:
        rows += evaluate_peel(run, data, cfg, budgets, split, scale=scale)
    for precision in precisions:
        rows += evaluate_peel(run, data, cfg, budgets, split, precision=precision)
    if reference:
        rows += reference_rows(run, data, cfg, split)
    if baselines:
        methods = None if baselines is True else list(baselines)
        rows += evaluate_baselines(data, cfg, budgets, progress, methods, run=run, split=split,
                                   tune_trials=tune_trials, executor=executor)
    if missing:
        for row in rows:
            row.detail.update(partial=True, missing_groups=missing)
    if split == "test":
        _save_rows(Path(run) / "eval.json", rows, data, cfg)
    return rows


def _save_rows(path: Path, rows: list[EvalRow], data: InteractionData, cfg: RunConfig) -> None:
    old = read_json(path)["rows"] if path.exists() else []
    new = [asdict(r) for r in rows]
    keys = {(r["method"], r["budget"]) for r in new}
    merged = [r for r in old if (r["method"], r["budget"]) not in keys] + new
    write_json(path, {"peel_version": __version__, "dataset": data.name,
                      "n_items": data.n_items, "full_dim": cfg.pretrain.dim,
                      "full_table_bytes": full_table_bytes(data.n_items, cfg.pretrain.dim),
                      "split_digest": runfolder.split_digest(data), "rows": merged})


def merge_eval_rows(run: str | Path, source: str | Path) -> list[EvalRow]:
    """`peel evaluate RUN --merge FILE`: add the rows of another copy's eval.json to RUN's.

    Why: baselines can be tuned elsewhere (``--baselines-only`` on a machine with a GPU, given
    only the run's data and config). Rows are merged by method and budget, like
    :func:`evaluate`'s own. A file made on another dataset, catalogue, full size or split is
    refused, naming the field that differs.
    """
    cfg = load_run_config(run)
    data = run_data(run, cfg)
    doc = read_json(source)
    ours = {"dataset": data.name, "n_items": data.n_items, "full_dim": cfg.pretrain.dim,
            "split_digest": runfolder.split_digest(data)}
    for key, value in ours.items():
        if doc.get(key) != value:
            raise ValueError(f"{source}: {key} is {doc.get(key)!r}, but {run} has {value!r}; "
                             "merge only rows evaluated on a copy of this run")
    known = {f.name for f in fields(EvalRow)}
    rows = [EvalRow(**{k: v for k, v in r.items() if k in known}) for r in doc["rows"]]
    _save_rows(Path(run) / "eval.json", rows, data, cfg)
    return rows


# ---------------------------------------------------------------------------------------------
# peel deploy / peel pretrain
# ---------------------------------------------------------------------------------------------


def deploy_package(run: str | Path, budget: int | float | str, out: str | Path, *,
                   user: int | None = None, group: int | None = None,
                   partial: bool = False, **overrides: Any) -> tuple[int, Any]:
    """Write the package of one user group (``group``) or one user (``user``) of a run.

    Built with the run's :func:`deploy_options` (``overrides``: similarity, weighting, scale,
    selection, seed, precision), so it ranks exactly as ``peel evaluate`` measured. A one-user
    package also stores the items the user already has (excluded when ranking) and the
    dataset's item ids when they are integers. A bare folder of group files (no config.toml)
    takes the package defaults. Returns (group, BudgetReport).
    """
    from peel.package import build_package

    if (user is None) == (group is None):
        raise ValueError("deploy: give exactly one of user= or group=")
    runfolder.check_complete(run, partial)
    group = runfolder.find_user_group(run, user) if user is not None else group
    arrays = runfolder.load_group(run, int(group))
    is_run = runfolder.config_path(run).exists()
    cfg = load_run_config(run) if is_run else None
    if "precision" in overrides:
        overrides["precision"] = run_precision(overrides["precision"], run)
    options = with_overrides(deploy_options(cfg, run) if cfg else DeployOptions(), **overrides)
    seen = item_ids = None
    if cfg is not None and user is not None:
        data = run_data(run, cfg)
        seen = data.seen_matrix("test")[user].indices.astype(np.int64)
        item_ids = _integer_ids(data.item_ids)
    report = build_package(out, arrays, budget, user=user, group=int(group), options=options,
                           item_ids=item_ids, seen=seen)
    return int(group), report


def _integer_ids(ids: np.ndarray) -> np.ndarray | None:
    """The dataset's own item ids when they are integers (packages store int64 ids)."""
    try:
        return np.asarray(ids).astype(np.int64)
    except ValueError:
        return None


def pretrain_only(spec: str, data_cfg: DataConfig, pretrain_cfg: PretrainConfig,
                  out: str | Path, cache_dir: str | Path | bool | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Stage 1 alone (`peel pretrain`): embeddings, log and test/valid metrics in ``out``."""
    from peel.eval import dot_scorer
    from peel.eval import evaluate as evaluate_scorer

    pretrain_cfg.validate()
    if pretrain_cfg.trials > 1:
        raise ValueError(f"pretrain.trials = {pretrain_cfg.trials}: `peel pretrain` trains one "
                         "setting; stage 1 is tuned inside `peel train` (--set "
                         "pretrain.trials=N)")
    out = Path(out)
    data = resolve_data(spec, data_cfg, cache_dir)
    write_run_metadata(out, "pretrain", {"data": data_cfg, "pretrain": pretrain_cfg,
                                         "data_source": spec}, pretrain_cfg.seed)
    t0 = time.perf_counter()
    result = pretrain(data, pretrain_cfg, out_dir=out / "checkpoint", progress=progress)
    seconds = time.perf_counter() - t0
    scorer = dot_scorer(result.user_emb, result.item_emb)
    valid = evaluate_scorer(scorer, data, "valid").metrics if data.valid.nnz else {}
    test = evaluate_scorer(scorer, data, "test").metrics if data.test.nnz else {}
    save_result(result, out, test)
    summary = {"dataset": data.name, "best_epoch": result.best_epoch, "seconds": seconds,
               "valid": valid, "test": test, "out": str(out)}
    write_json(out / "pretrain_summary.json", summary)
    return summary


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
        deploy=DeployConfig(budgets=PAPER_BUDGETS,
                            baselines=("pmf", "lightgcn", "lightgcn-svd")),
    )
