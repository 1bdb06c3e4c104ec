"""Interactions in, one in-memory dataset out: the first stage of the PEEL data flow.

Every later stage (pretraining, grouping, fine-tuning, deployment, evaluation) reads the same
:class:`InteractionData`: CSR train/valid/test matrices over contiguous ids, the maps back to the
user's own ids, and item popularity. Readers never crash with a traceback on bad input and never
drop rows silently: every dropped row is counted in :attr:`InteractionData.log` with its reason.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from peel import __version__
from peel.errors import PeelError
from peel.io import atomic_path, check_input_file, iter_lines

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
SPLITS = ("train", "valid", "test")
_COLUMN_ALIASES = {
    "user": ("user", "user_id", "userid", "uid", "u", "visitor", "visitorid", "customer_id"),
    "item": ("item", "item_id", "itemid", "iid", "i", "movie", "movieid", "movie_id", "product",
             "product_id", "business_id", "artist", "artistid", "artist_id", "track", "song"),
    "rating": ("rating", "ratings", "score", "weight", "value", "label", "count", "playcount"),
    "timestamp": ("timestamp", "time", "ts", "date", "datetime", "unix_time"),
}


class DataError(PeelError):
    """Bad input, with the file, line and the fix in the message."""


FORMATS = ("auto", "lightgcn", "delimited", "parquet")
SPLIT_MODES = ("auto", "files", "random")
#: Rows parsed into Python lists before being packed into numpy arrays: bounds the memory of
#: per-row Python objects on large files.
_CHUNK_ROWS = 1 << 16
#: A LightGCN line: integer ids (ASCII digits only) separated by ASCII whitespace.
_INT_LINE = re.compile(r"\s*-?[0-9]+(?:\s+-?[0-9]+)*\s*", re.ASCII)
_INT_TOKEN = re.compile(r"-?[0-9]+", re.ASCII)
_MAX_ID = 2**63 - 1


@dataclass(frozen=True)
class DataConfig:
    """How raw interactions become a dataset. Defaults follow the paper (Section V-A)."""

    fmt: str = "auto"  # auto | lightgcn | delimited | parquet
    delimiter: str | None = None  # None: sniffed (',', '\t', ';', '::', '|' or whitespace)
    header: bool | None = None  # None: detected from the first line
    columns: tuple[str, ...] | None = None  # e.g. ("user", "item", "rating", "timestamp")
    rating_threshold: float | None = None  # keep rows with rating >= threshold (implicit)
    min_user_interactions: int = 0  # iterative k-core; the paper uses 10 and 10
    min_item_interactions: int = 0
    split: str = "auto"  # auto | files | random ; auto = files when the input has splits
    split_ratios: tuple[float, float, float] = (0.7, 0.1, 0.2)
    seed: int = 2024


@dataclass
class InteractionData:
    """The dataset every stage shares. Matrices are float32 CSR with one row per user."""

    train: sp.csr_matrix
    valid: sp.csr_matrix
    test: sp.csr_matrix
    user_ids: np.ndarray  # original id (as str) of each contiguous user index
    item_ids: np.ndarray
    name: str = "dataset"
    log: dict[str, int] = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return int(self.train.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.train.shape[1])

    @property
    def item_popularity(self) -> np.ndarray:
        """Training interactions per item: the popularity PEEL segments items by."""
        return np.asarray(self.train.getnnz(axis=0), dtype=np.int64)

    def split_matrix(self, split: str) -> sp.csr_matrix:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return getattr(self, split)

    def seen_matrix(self, split: str) -> sp.csr_matrix:
        """Items to exclude when ranking for ``split``: train, plus valid when testing."""
        if split == "test":
            return (self.train + self.valid).tocsr()
        return self.train

    def stats(self) -> dict[str, Any]:
        pop = np.sort(self.item_popularity)[::-1]
        total = max(int(pop.sum()), 1)
        top = max(1, round(0.2 * len(pop)))
        n_all = self.train.nnz + self.valid.nnz + self.test.nnz
        return {
            "name": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": int(n_all),
            "density": float(n_all / max(self.n_users * self.n_items, 1)),
            "train": int(self.train.nnz),
            "valid": int(self.valid.nnz),
            "test": int(self.test.nnz),
            "users_with_test": int((self.test.getnnz(axis=1) > 0).sum()),
            "popularity_gini": float(gini(pop)),
            "top20pct_items_share": float(pop[:top].sum() / total),
            "cold_items_in_train": int((pop == 0).sum()),
            "dropped": dict(self.log),
        }


def gini(values: np.ndarray) -> float:
    """Gini coefficient of item popularity: 0 = uniform, 1 = one item has everything."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    n = len(v)
    if n == 0 or v.sum() == 0:
        return 0.0
    cum = np.cumsum(v)
    return float((n + 1 - 2 * (cum / cum[-1]).sum()) / n)


# ---------------------------------------------------------------------------------------------
# Readers: each returns raw (user, item) string/int columns per split plus counters.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Raw:
    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray | None = None


def _read_lightgcn_file(path: Path) -> _Raw:
    """``user item item ...`` lines. Ids must be integers; a user line may have no items."""
    users: list[np.ndarray] = []
    items: list[np.ndarray] = []
    for lineno, line in iter_lines(path, "LightGCN data file", error=DataError):
        tokens = line.split()
        if not tokens:
            continue
        ids = _lightgcn_ids(line, tokens, path, lineno)
        if (ids < 0).any():
            raise DataError(f"{path}:{lineno}: negative id; ids must be >= 0")
        users.append(np.full(len(ids) - 1, ids[0], dtype=np.int64))
        items.append(ids[1:])
    if not users:
        raise DataError(f"{path}: file is empty; expected lines 'user item item ...'")
    return _Raw(np.concatenate(users), np.concatenate(items))


def _lightgcn_ids(line: str, tokens: list[str], path: Path, lineno: int) -> np.ndarray:
    """The integer ids of one line; only ASCII digits, and each id must fit in 64 bits."""
    if _INT_LINE.fullmatch(line) is None:
        bad = next((t for t in tokens if _INT_TOKEN.fullmatch(t) is None), line.strip())
        raise DataError(
            f"{path}:{lineno}: non-integer id {bad[:40]!r} in a LightGCN-format file; each line"
            " must be 'user item item ...' with integer ids (ASCII digits). For string ids use"
            " a delimited file with columns user,item"
        )
    too_big = next((t for t in tokens if len(t.lstrip("-")) > 18 and abs(int(t)) > _MAX_ID),
                   None)
    if too_big is not None:
        raise DataError(f"{path}:{lineno}: id {too_big[:40]} is larger than {_MAX_ID} (64-bit);"
                        " renumber the ids, or use a delimited file, where ids are strings")
    return np.array(tokens, dtype=np.int64)


def _sniff_delimiter(first: str, path: Path) -> str | None:
    for cand in ("::", "\t", ",", ";", "|"):
        if cand in first:
            return cand
    if len(first.split()) >= 2:
        return None  # whitespace
    raise DataError(
        f"{path}:1: cannot tell the delimiter of {first.strip()!r}; expected at least two columns"
        " (user, item) separated by ',', tab, ';', '|', '::' or spaces. Pass delimiter="
        " (--delimiter)"
    )


def _split_line(line: str, delimiter: str | None, path: Path | None = None,
                lineno: int = 0) -> list[str]:
    if delimiter is None:
        return line.split()
    if len(delimiter) == 1:
        if '"' not in line:  # what csv.reader returns for an unquoted row, without its cost
            return line.split(delimiter)
        try:
            return next(csv.reader([line], delimiter=delimiter))
        except csv.Error as err:
            raise DataError(f"{path}:{lineno}: cannot split {line.strip()[:80]!r} at "
                            f"{delimiter!r} ({err}); fix the row") from None
    return [t.strip() for t in line.split(delimiter)]


def _resolve_columns(header: list[str], path: Path) -> list[str]:
    roles = []
    for name in header:
        key = name.strip().lower().replace(" ", "_")
        role = next((r for r, names in _COLUMN_ALIASES.items() if key in names), None)
        if role is None:
            raise DataError(
                f"{path}:1: unknown column {name!r}; columns must be user, item[, rating]"
                "[, timestamp] (or aliases such as user_id, item_id, movieId). Rename it or pass"
                " --columns user,item,rating,timestamp (use 'skip' for columns to ignore)"
            )
        roles.append(role)
    _check_roles(roles, path)
    return roles


def _check_roles(roles: Sequence[str], path: Path) -> None:
    for needed in ("user", "item"):
        if needed not in roles:
            raise DataError(f"{path}: no {needed!r} column; got columns {list(roles)}")
    dup = {r for r in roles if r != "skip" and roles.count(r) > 1}
    if dup:
        raise DataError(f"{path}: column(s) {sorted(dup)} given more than once")


def _looks_like_header(tokens: list[str]) -> bool:
    keys = {t.strip().lower().replace(" ", "_") for t in tokens}
    known = {n for names in _COLUMN_ALIASES.values() for n in names}
    return bool(keys & known) and not all(_is_number(t) for t in tokens)


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _read_delimited(path: Path, cfg: DataConfig) -> _Raw:
    """Stream a delimited file line by line: memory grows with the rows kept, not the file."""
    lines = _text_rows(path)
    first = next(lines, None)
    if first is None:
        raise DataError(f"{path}: file is empty; expected rows user,item[,rating][,timestamp]")
    first_no, first_line = first
    delimiter = cfg.delimiter if cfg.delimiter is not None else _sniff_delimiter(first_line, path)
    first_tokens = _split_line(first_line, delimiter, path, first_no)
    has_header = cfg.header if cfg.header is not None else _looks_like_header(first_tokens)
    roles = _roles(first_tokens, has_header, cfg, path, first_no)
    rows = _Rows(path, roles)
    if not has_header:
        rows.add(first_tokens, first_no, first_line)
    for lineno, line in lines:
        rows.add(_split_line(line, delimiter, path, lineno), lineno, line)
    return rows.finish()


def _text_rows(path: Path) -> Iterator[tuple[int, str]]:
    """Non-blank rows with their line numbers. Old Mac ``\\r`` endings (and the other breaks
    ``str.splitlines`` knows) still separate rows, as they did when files were read whole."""
    for lineno, raw in iter_lines(path, "data file", error=DataError):
        for line in raw.splitlines():
            if line.strip():
                yield lineno, line


def _roles(first_tokens: list[str], has_header: bool, cfg: DataConfig, path: Path,
           lineno: int) -> list[str]:
    """Column roles from --columns, the header, or (no header) the count of the first row."""
    if cfg.columns is not None:
        roles = list(cfg.columns)
        _check_roles(roles, path)
        return roles
    if has_header:
        return _resolve_columns(first_tokens, path)
    if len(first_tokens) > 4:
        raise DataError(
            f"{path}:{lineno}: {len(first_tokens)} columns but no header; without a header the"
            " columns are read as user,item[,rating][,timestamp]. Add a header row or pass"
            " --columns naming every column (use 'skip' for columns to ignore)")
    return ["user", "item", "rating", "timestamp"][: max(2, len(first_tokens))]


class _Rows:
    """Collects user/item/rating columns, packing them into numpy chunks as it goes (the
    per-row Python strings of a large file would otherwise cost far more than the file)."""

    def __init__(self, path: Path, roles: list[str]) -> None:
        self.path = path
        self.roles = roles
        self.ncols = len(roles)
        self.iu, self.ii = roles.index("user"), roles.index("item")
        self.ir = roles.index("rating") if "rating" in roles else None
        self.users: list[str] = []
        self.items: list[str] = []
        self.ratings: list[float] = []
        self.chunks: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])

    def add(self, tokens: list[str], lineno: int, line: str) -> None:
        if len(tokens) != self.ncols:
            raise DataError(
                f"{self.path}:{lineno}: expected {self.ncols} columns ({', '.join(self.roles)}),"
                f" found {len(tokens)} in {line.strip()[:80]!r}; fix the row or pass --columns"
                " (use 'skip' for columns to ignore)"
            )
        self.users.append(tokens[self.iu].strip())
        self.items.append(tokens[self.ii].strip())
        if self.ir is not None:
            tok = tokens[self.ir]
            try:
                value = float(tok)
            except ValueError:
                raise self._rating_error(tok, lineno, "a number") from None
            if not math.isfinite(value):
                raise self._rating_error(tok, lineno, "a finite number")
            self.ratings.append(value)
        if len(self.users) >= _CHUNK_ROWS:
            self._flush()

    def _rating_error(self, tok: str, lineno: int, expected: str) -> DataError:
        return DataError(f"{self.path}:{lineno}: rating {tok[:40]!r} is not {expected}; fix the"
                         " row, or pass --columns naming that column 'skip'")

    def _flush(self) -> None:
        if self.users:
            self.chunks[0].append(np.asarray(self.users))
            self.chunks[1].append(np.asarray(self.items))
        if self.ratings:
            self.chunks[2].append(np.asarray(self.ratings, dtype=np.float64))
        self.users, self.items, self.ratings = [], [], []

    def finish(self) -> _Raw:
        self._flush()
        users, items, ratings = self.chunks
        if not users:
            raise DataError(f"{self.path}: no data rows after the header")
        rating_arr = np.concatenate(ratings) if self.ir is not None else None
        return _Raw(np.concatenate(users), np.concatenate(items), rating_arr)


def _read_parquet(path: Path, cfg: DataConfig) -> _Raw:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet needs pyarrow; install it with pip install 'peel[parquet]'"
        ) from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow's errors have no common base beyond Exception
        raise DataError(f"{path}: not a readable Parquet file ({type(err).__name__}: "
                        f"{str(err)[:200]}); check the file or convert it to CSV") from None
    names = list(cfg.columns) if cfg.columns else _resolve_columns(table.column_names, path)
    cols = {role: table.column(i).to_numpy() for i, role in enumerate(names) if role != "skip"}
    ratings = cols.get("rating")
    return _Raw(
        cols["user"].astype(str),
        cols["item"].astype(str),
        None if ratings is None else np.asarray(ratings, dtype=np.float64),
    )


# ---------------------------------------------------------------------------------------------
# Cleaning: threshold, duplicates, k-core, split.
# ---------------------------------------------------------------------------------------------


def k_core(u: np.ndarray, i: np.ndarray, n_users: int, n_items: int, min_user: int,
           min_item: int) -> np.ndarray:
    """Mask of interactions kept by the iterative k-core filter (users >= k_u, items >= k_i)."""
    keep = np.ones(len(u), dtype=bool)
    if min_user <= 1 and min_item <= 1:
        return keep
    while True:
        ucount = np.bincount(u[keep], minlength=n_users)
        icount = np.bincount(i[keep], minlength=n_items)
        new = keep & (ucount[u] >= min_user) & (icount[i] >= min_item)
        if new.sum() == keep.sum():
            return new
        keep = new


def random_split(u: np.ndarray, ratios: Sequence[float], seed: int) -> np.ndarray:
    """Per-user random split: 0=train, 1=valid, 2=test, in the given ratios (paper: 7:1:2).

    Each user's interactions are shuffled, then cut at round(n*r_train) and round(n*(r_train +
    r_valid)). Every user with at least one interaction keeps one in train.
    """
    ratios = np.asarray(ratios, dtype=np.float64)
    if ratios.shape != (3,) or (ratios < 0).any() or not np.isclose(ratios.sum(), 1.0):
        raise ValueError(f"split ratios must be three non-negative numbers summing to 1: {ratios}")
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(u)), u))
    su = u[order]
    counts = np.bincount(su)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(su)) - starts[su]
    n = counts[su]
    cut1 = np.maximum(np.rint(n * ratios[0]), 1)
    cut2 = np.maximum(np.rint(n * (ratios[0] + ratios[1])), cut1)
    part_sorted = np.where(rank < cut1, 0, np.where(rank < cut2, 1, 2)).astype(np.int8)
    part = np.empty_like(part_sorted)
    part[order] = part_sorted
    return part


def _csr(u: np.ndarray, i: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    m = sp.csr_matrix((np.ones(len(u), dtype=np.float32), (u, i)), shape=shape)
    m.sum_duplicates()
    m.data[:] = 1.0
    m.sort_indices()
    return m


# ---------------------------------------------------------------------------------------------
# Public entry point.
# ---------------------------------------------------------------------------------------------


def validate_data_config(cfg: DataConfig) -> None:
    """Options that would otherwise be ignored or silently change the data."""
    if cfg.fmt not in FORMATS:
        raise DataError(f"data format {cfg.fmt!r}: choose one of {', '.join(FORMATS)}")
    if cfg.delimiter is not None and (not cfg.delimiter or any(
            c in cfg.delimiter for c in "\r\n\"")):
        raise DataError(f"delimiter {cfg.delimiter!r}: expected one or more characters other "
                        "than quotes and line breaks, e.g. --delimiter ';'")
    if cfg.split not in SPLIT_MODES:
        raise DataError(f"split {cfg.split!r}: choose one of {', '.join(SPLIT_MODES)}")
    threshold = cfg.rating_threshold
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(
            threshold, (int, float)) or not math.isfinite(threshold)):
        raise DataError(f"rating threshold {threshold!r}: expected a finite number, e.g."
                        " --rating-threshold 4")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, (int, np.integer)) or not (
            0 <= cfg.seed < 2**63):
        raise DataError(f"seed {cfg.seed!r}: expected an integer in [0, 2^63)")
    for name in ("min_user_interactions", "min_item_interactions"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise DataError(f"{name} {value!r}: expected a non-negative integer")


def check_inputs(path: Path, fmt: str) -> None:
    """Refuse a wrong kind of path before any file is opened (a FIFO would block, /dev/zero
    never end) and explain a format that does not fit the path."""
    if fmt == "lightgcn":
        if not path.is_dir():
            raise DataError(
                f"{path}: --format lightgcn needs a folder holding train.txt (and optionally"
                " valid.txt, test.txt); for a single interactions file use --format delimited")
        if not (path / "train.txt").exists():
            raise DataError(f"{path}: folder has no train.txt; a LightGCN dataset folder holds"
                            " train.txt and optionally valid.txt and test.txt")
    elif path.is_dir():
        raise DataError(f"{path}: is a folder; --format {fmt} reads one file (a folder of"
                        " train.txt/test.txt is --format lightgcn)")
    for f in _input_files(path, fmt):
        check_input_file(f, "data file", DataError)


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "train.txt").exists():
            return "lightgcn"
        raise DataError(
            f"{path}: folder has no train.txt; a dataset folder holds train.txt and optionally"
            " valid.txt and test.txt with lines 'user item item ...'"
        )
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.suffix.lower() in (".parquet", ".pq"):
        return "parquet"
    return "delimited"


def _input_files(path: Path, fmt: str) -> list[Path]:
    if fmt == "lightgcn":
        return [path / f"{s}.txt" for s in SPLITS if (path / f"{s}.txt").exists()]
    return [path]


def cache_key(path: Path, cfg: DataConfig) -> str:
    """Content hash of the input files plus every option that changes the result."""
    fmt = cfg.fmt if cfg.fmt != "auto" else detect_format(path)
    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_FORMAT, "cfg": asdict(cfg), "fmt": fmt},
                        sort_keys=True).encode())
    for f in _input_files(path, fmt):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:32]


def default_cache_dir() -> Path:
    env = os.environ.get("PEEL_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "peel"


def load_dataset(path: str | os.PathLike[str], cfg: DataConfig | None = None, *,
                 cache_dir: str | os.PathLike[str] | bool | None = None) -> InteractionData:
    """Load interactions from a LightGCN folder, a delimited file or Parquet.

    ``cache_dir=False`` disables the cache; ``None`` uses ``$PEEL_CACHE_DIR`` or ~/.cache/peel.
    """
    cfg = cfg or DataConfig()
    validate_data_config(cfg)
    path = Path(path)
    fmt = cfg.fmt if cfg.fmt != "auto" else detect_format(path)
    check_inputs(path, fmt)
    if fmt != "lightgcn" and cfg.split == "files":
        raise DataError(f"{path}: --split files needs separate train/valid/test files (a"
                        " LightGCN folder); a single file is split with --split random (or"
                        " auto)")
    cache_file = None
    if cache_dir is not False:
        root = Path(cache_dir) if cache_dir else default_cache_dir()
        cache_file = root / f"{path.name or 'data'}-{cache_key(path, cfg)}.npz"
        if cache_file.exists():
            try:
                return load_cached(cache_file)
            except (OSError, ValueError, KeyError) as err:
                log.warning("ignoring unreadable cache %s: %s", cache_file, err)
    data = _build(path, fmt, cfg)
    if cache_file is not None:
        try:
            save_cached(data, cache_file)
        except OSError as err:
            log.warning("could not write dataset cache %s: %s", cache_file, err)
    return data


def _build(path: Path, fmt: str, cfg: DataConfig) -> InteractionData:
    if fmt == "lightgcn":
        raws = {s: _read_lightgcn_file(path / f"{s}.txt") for s in SPLITS
                if (path / f"{s}.txt").exists()}
    elif fmt == "delimited":
        raws = {"all": _read_delimited(path, cfg)}
    elif fmt == "parquet":
        raws = {"all": _read_parquet(path, cfg)}
    else:
        raise DataError(f"unknown format {fmt!r}; expected auto, lightgcn, delimited or parquet")
    return assemble(raws, cfg, name=path.name or str(path))


def assemble(raws: dict[str, _Raw], cfg: DataConfig, name: str) -> InteractionData:
    """Remap ids, clean, filter and split raw columns (``train/valid/test`` or ``all``)."""
    validate_data_config(cfg)
    counts: dict[str, int] = {}
    parts = list(raws)
    sizes = [len(raws[p].users) for p in parts]
    users = _concat_ids([raws[p].users for p in parts])
    items = _concat_ids([raws[p].items for p in parts])
    split_of = np.repeat(np.arange(len(parts)), sizes)
    if cfg.rating_threshold is not None:
        rating_parts = [raws[p].ratings for p in parts]
        if any(r is None for r in rating_parts):
            raise DataError(
                "rating_threshold is set but the input has no rating column; remove the"
                " threshold or add a rating column"
            )
        ratings = np.concatenate(rating_parts)
        keep = ratings >= cfg.rating_threshold
        counts["below_rating_threshold"] = int((~keep).sum())
        users, items, split_of = users[keep], items[keep], split_of[keep]
    user_ids, u = _index(users)
    item_ids, i = _index(items)
    u, i, split_of, dup = _dedupe_keep_split(u, i, split_of, len(item_ids))
    counts["duplicates"] = dup
    keep = k_core(u, i, len(user_ids), len(item_ids), cfg.min_user_interactions,
                  cfg.min_item_interactions)
    counts["k_core"] = int((~keep).sum())
    u, i, split_of = u[keep], i[keep], split_of[keep]
    if parts == ["all"] or cfg.split == "random":
        split_of = random_split(u, cfg.split_ratios, cfg.seed)
        names = list(SPLITS)
    else:
        names = parts
    return _finish(u, i, split_of, names, user_ids, item_ids, counts, name)


def _concat_ids(parts: list[np.ndarray]) -> np.ndarray:
    """Keep integer ids as integers (fast, numeric order); anything else becomes strings."""
    if all(np.issubdtype(p.dtype, np.integer) for p in parts):
        return np.concatenate(parts).astype(np.int64)
    return np.concatenate([p.astype(str) for p in parts])


def _index(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous indices in sorted id order (numeric for integer ids), plus the ids as str."""
    ids, inverse = np.unique(values, return_inverse=True)
    return ids.astype(str), inverse.astype(np.int64).ravel()


def _dedupe_keep_split(u: np.ndarray, i: np.ndarray, s: np.ndarray,
                       n_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Drop repeated (user, item) pairs, keeping the earliest split (train before test)."""
    key = u * n_items + i
    order = np.lexsort((s, key))
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[order][1:] != key[order][:-1]
    kept = np.sort(order[first])
    return u[kept], i[kept], s[kept], len(key) - len(kept)


def _finish(u: np.ndarray, i: np.ndarray, split_of: np.ndarray, names: Sequence[str],
            user_ids: np.ndarray, item_ids: np.ndarray, counts: dict[str, int],
            name: str) -> InteractionData:
    """Compact ids to the surviving rows and build the CSR splits."""
    train_code = names.index("train") if "train" in names else None
    if train_code is None:
        raise DataError("the input has valid/test files but no train.txt")
    in_train = split_of == train_code
    has_train_user = np.bincount(u[in_train], minlength=len(user_ids)) > 0
    orphan = ~in_train & ~has_train_user[u]
    counts["eval_rows_of_users_without_train"] = int(orphan.sum())
    u, i, split_of = u[~orphan], i[~orphan], split_of[~orphan]
    train_items = np.bincount(i[split_of == train_code], minlength=len(item_ids)) > 0
    counts["eval_rows_on_items_unseen_in_train"] = int((~train_items[i]).sum())
    used_u = np.unique(u)
    used_i = np.unique(i)
    umap = np.full(len(user_ids), -1, dtype=np.int64)
    umap[used_u] = np.arange(len(used_u))
    imap = np.full(len(item_ids), -1, dtype=np.int64)
    imap[used_i] = np.arange(len(used_i))
    u, i = umap[u], imap[i]
    shape = (len(used_u), len(used_i))
    mats = {}
    for code, split in enumerate(names):
        sel = split_of == code
        mats[split] = _csr(u[sel], i[sel], shape)
    for split in SPLITS:
        mats.setdefault(split, sp.csr_matrix(shape, dtype=np.float32))
    for key, value in counts.items():
        if value:
            log.info("%s: %d rows dropped or flagged (%s)", name, value, key)
    return InteractionData(
        mats["train"], mats["valid"], mats["test"], user_ids[used_u], item_ids[used_i],
        name=name, log=counts,
    )


# ---------------------------------------------------------------------------------------------
# Cache: npz of CSR parts + string id arrays + JSON metadata; never pickle.
# ---------------------------------------------------------------------------------------------


def save_cached(data: InteractionData, path: Path) -> None:
    arrays: dict[str, np.ndarray] = {
        "user_ids": data.user_ids.astype(str),
        "item_ids": data.item_ids.astype(str),
        "meta": np.frombuffer(json.dumps({
            "format": CACHE_FORMAT, "peel": __version__, "name": data.name,
            "log": data.log, "shape": [data.n_users, data.n_items],
        }).encode(), dtype=np.uint8),
    }
    for split in SPLITS:
        m = data.split_matrix(split)
        arrays[f"{split}_indptr"] = m.indptr.astype(np.int64)
        arrays[f"{split}_indices"] = m.indices.astype(np.int32)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def load_cached(path: Path) -> InteractionData:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        if meta.get("format") != CACHE_FORMAT:
            raise ValueError(f"cache format {meta.get('format')} != {CACHE_FORMAT}")
        shape = tuple(meta["shape"])
        mats = {}
        for split in SPLITS:
            indices = z[f"{split}_indices"]
            mats[split] = sp.csr_matrix(
                (np.ones(len(indices), dtype=np.float32), indices, z[f"{split}_indptr"]),
                shape=shape)
        return InteractionData(mats["train"], mats["valid"], mats["test"], z["user_ids"],
                               z["item_ids"], name=meta["name"], log=dict(meta["log"]))


def from_interactions(users: Iterable[Any], items: Iterable[Any], cfg: DataConfig | None = None,
                      name: str = "interactions") -> InteractionData:
    """Build a randomly split dataset from in-memory columns (tests, notebooks)."""
    raw = _Raw(np.asarray(list(users)).astype(str), np.asarray(list(items)).astype(str))
    return assemble({"all": raw}, cfg or DataConfig(), name=name)


def from_splits(train: sp.spmatrix, valid: sp.spmatrix, test: sp.spmatrix,
                name: str = "matrices") -> InteractionData:
    """Wrap already-indexed split matrices (ids are their row/column numbers)."""
    shape = train.shape
    # copy: the caller's matrices stay as given (and may be read-only, e.g. from Ray's store)
    mats = [sp.csr_matrix(m, dtype=np.float32, copy=True) for m in (train, valid, test)]
    for m in mats:
        if m.shape != shape:
            raise ValueError(f"split shapes differ: {[x.shape for x in mats]}")
        m.data[:] = 1.0
        m.sort_indices()
    return InteractionData(*mats, user_ids=np.arange(shape[0]).astype(str),
                           item_ids=np.arange(shape[1]).astype(str), name=name)
