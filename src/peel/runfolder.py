"""The run folder contract: which files a run holds, how they are read, and what they pin.

One module owns the layout so that training, evaluation, deployment, the Python API and the
benchmarks cannot disagree about it:

    RUN/config.toml            resolved configuration (written by peel.pipeline)
    RUN/data.json              what the run was trained on: source, file hashes, split hash
    RUN/data.npz               the dataset itself, when it was given in memory
    RUN/partition.npz          user group of every user, item group of every item
    RUN/groups/group_NNN.npz   stage 2 arrays of user group NNN (+ group_NNN.json)
    RUN/precision.json         the precision rule "auto" stands for in this run, chosen on its
                               validation split (peel.autoprecision)

Later commands verify ``data.json`` before they use the data: a data file that changed after
training (even with its rows only reordered) would silently give another split, so evaluation
and deployment would measure users against items they trained on.
"""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peel.data import SPLITS, InteractionData, load_cached, save_cached
from peel.io import file_digest, read_json, write_json
from peel.package import GroupArrays, check_group_arrays

PathLike = str | os.PathLike[str]

CONFIG_FILE = "config.toml"
DATA_RECORD = "data.json"
STORED_DATA_FILE = "data.npz"
PARTITION_FILE = "partition.npz"
GROUP_FILE = "group_{:03d}.npz"
PRECISION_FILE = "precision.json"
#: ``run.data`` of a run whose dataset was given in memory and lives in RUN/data.npz.
STORED = "stored"
_GROUP_RE = re.compile(r"group_(\d+)\.npz")


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked; the message names the file and the fix."""


# --------------------------------------------------------------------------- layout


def config_path(run: PathLike) -> Path:
    return Path(run) / CONFIG_FILE


def require_run(run: PathLike) -> Path:
    """The run folder, or an error saying it is not one (no config.toml)."""
    path = config_path(run)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a run folder (no {CONFIG_FILE}); train one first "
                                "(peel.PEEL(config).fit or peel train)")
    return Path(run)


def group_paths(run: PathLike, group: int) -> tuple[Path, Path]:
    """(arrays .npz, summary .json) of user group ``group``."""
    base = Path(run) / "groups" / f"group_{group:03d}"
    return base.with_suffix(".npz"), base.with_suffix(".json")


def group_files(run: PathLike) -> list[tuple[int, Path]]:
    """(group, path) for every group file present in a run, in group order."""
    folder = Path(run) / "groups"
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder; a run folder holds "
                         f"groups/{GROUP_FILE.format(0)} ... from the group training stage")
    found = []
    for path in folder.iterdir():
        match = _GROUP_RE.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    if not found:
        raise ValueError(f"{folder}: no group_NNN.npz files; run the group training stage first")
    return sorted(found)


def _load_npz(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            is_zip = fh.read(4) == b"PK\x03\x04"
        if not is_zip:
            raise ValueError(f"{path}: not a readable .npz file (no zip signature); write it "
                             f"with numpy.savez")
        with np.load(path, allow_pickle=False) as npz:
            missing = [n for n in names if n not in npz.files]
            if missing:
                raise ValueError(f"{path}: missing array(s) {', '.join(missing)}; expected "
                                 f"{', '.join(names)}")
            return {n: npz[n] for n in names}
    except FileNotFoundError as err:
        raise ValueError(f"{path}: no such file") from err
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npz file ({err})") from err
    except ValueError as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"{path}: holds object (pickled) arrays, which peel never loads; "
                         f"save plain numeric arrays with numpy.savez") from err


def load_group(run: PathLike, group: int) -> GroupArrays:
    """A user group's arrays from a run folder, validated."""
    path = group_paths(run, group)[0]
    if not path.exists():
        groups = [g for g, _ in group_files(run)]
        raise ValueError(f"{path}: no such file; this run has groups "
                         f"{groups[0]}..{groups[-1]} ({len(groups)} files)")
    arrays = _load_npz(path, ("blocks", "alpha", "item_group", "users", "user_emb"))
    return check_group_arrays(**arrays, source=str(path))


def find_user_group(run: PathLike, user: int) -> int:
    """The user group whose ``users`` array holds ``user`` (reads only that array per file)."""
    owners = [g for g, path in group_files(run)
              if np.any(_load_npz(path, ("users",))["users"] == user)]
    if not owners:
        raise ValueError(f"user {user} is in no group of {Path(run) / 'groups'}; check the "
                         f"user index")
    if len(owners) > 1:
        raise ValueError(f"user {user} appears in several groups ({owners}); the run folder "
                         f"is inconsistent")
    return owners[0]


# --------------------------------------------------------------------------- completeness


def expected_groups(run: PathLike) -> list[int] | None:
    """User groups the partition promises, or None for a bare folder without partition.npz."""
    path = Path(run) / PARTITION_FILE
    if not path.exists():
        return None
    user_group = _load_npz(path, ("user_group",))["user_group"]
    return sorted(int(g) for g in np.unique(user_group))


def missing_groups(run: PathLike) -> list[int]:
    """Groups of the partition whose arrays were never written (training stopped early)."""
    expected = expected_groups(run)
    if expected is None:
        return []
    return [g for g in expected if not group_paths(run, g)[0].exists()]


def check_complete(run: PathLike, partial: bool = False) -> list[int]:
    """Refuse a run whose fine-tuning did not finish, unless ``partial`` allows it.

    Scoring only the groups present would report figures for a subset of users as if they
    were the run's; returns the missing groups (empty for a complete run).
    """
    missing = missing_groups(run)
    if missing and not partial:
        shown = ", ".join(str(g) for g in missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise RunFolderError(
            f"{run}: incomplete run, {len(missing)} user group(s) have no groups/ file "
            f"(missing groups: {shown}); finish training (re-run the same train call to "
            f"resume) or pass partial=True (--partial) to use only the groups present")
    return missing


def chosen_precision(run: PathLike) -> str | None:
    """The precision rule the run chose on its validation split, or None when it has none.

    The file comes from :mod:`peel.autoprecision`; a rule this version does not know (a file
    edited by hand, or written by a newer peel) is refused, naming the file and the fix.
    """
    from peel.budget import PRECISIONS

    path = Path(run) / PRECISION_FILE
    if not path.exists():
        return None
    doc = read_json(path)
    rule = doc.get("rule") if isinstance(doc, dict) else None
    if rule not in PRECISIONS:
        raise RunFolderError(f"{path}: 'rule' is {rule!r}, not one of {', '.join(PRECISIONS)}; "
                             "delete the file and re-run the same `peel train` call to choose "
                             "again")
    return str(rule)


# --------------------------------------------------------------------------- data pinning


def split_digest(data: InteractionData) -> str:
    """Content hash of the split a run uses: every split's CSR structure and both id maps."""
    h = hashlib.sha256()
    h.update(f"{data.n_users}x{data.n_items}".encode())
    for split in SPLITS:
        m = data.split_matrix(split)
        for arr in (m.indptr.astype(np.int64), m.indices.astype(np.int64)):
            h.update(np.ascontiguousarray(arr).tobytes())
    for ids in (data.user_ids, data.item_ids):
        h.update("\x1f".join(np.asarray(ids).astype(str).tolist()).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class DataRecord:
    """What a run was trained on (RUN/data.json)."""

    source: str  # run.data: a path, demo[:SEED] or "stored"
    files: dict[str, str]  # data file -> sha256 at training time
    split_sha256: str
    n_users: int
    n_items: int

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "files": self.files, "split_sha256": self.split_sha256,
                "n_users": self.n_users, "n_items": self.n_items}


def record_data(run: PathLike, source: str, data: InteractionData,
                files: list[Path]) -> DataRecord:
    """Write RUN/data.json for a run trained on ``data`` read from ``files``."""
    record = DataRecord(source, {str(f): file_digest(f) for f in files}, split_digest(data),
                        data.n_users, data.n_items)
    write_json(Path(run) / DATA_RECORD, record.to_dict())
    return record


def read_record(run: PathLike) -> DataRecord | None:
    """The run's data record; None for runs made before records existed."""
    path = Path(run) / DATA_RECORD
    if not path.exists():
        return None
    doc = read_json(path)
    return DataRecord(doc["source"], dict(doc["files"]), doc["split_sha256"],
                      int(doc["n_users"]), int(doc["n_items"]))


def verify_files(run: PathLike, record: DataRecord) -> None:
    """Refuse data files that changed since training, naming the file (checked before
    reading them: a changed file may not even parse the same way)."""
    for name, digest in record.files.items():
        path = Path(name)
        if not path.exists():
            raise RunFolderError(f"{path}: run {run} was trained on this file and it is gone; "
                                 "restore it, or train a new run on the data you have now")
        now = file_digest(path)
        if now != digest:
            raise RunFolderError(
                f"{path}: changed since run {run} was trained on it (sha256 {digest[:12]} "
                f"then, {now[:12]} now; even reordered rows change the split); restore the "
                "original file, or train a new run on the changed data")


def verify_split(run: PathLike, record: DataRecord, data: InteractionData) -> None:
    """Refuse data whose split differs from the one the run was trained on."""
    now = split_digest(data)
    if now != record.split_sha256:
        where = ", ".join(record.files) or record.source
        raise RunFolderError(
            f"{where}: the split made now ({data.n_users} users, {data.n_items} items, sha256 "
            f"{now[:12]}) is not the one run {run} was trained on ({record.n_users} users, "
            f"{record.n_items} items, sha256 {record.split_sha256[:12]}); use the original "
            "data and data settings, or train a new run")


def store_data(run: PathLike, data: InteractionData) -> Path:
    """Save an in-memory dataset's splits into the run (npz, no pickle)."""
    path = Path(run) / STORED_DATA_FILE
    save_cached(data, path)
    return path


def load_stored_data(run: PathLike) -> InteractionData:
    path = Path(run) / STORED_DATA_FILE
    if not path.exists():
        raise RunFolderError(f"{path}: missing; this run's data was given in memory and stored "
                             "here at training time; the run folder is incomplete")
    return load_cached(path)
