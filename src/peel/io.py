"""Safe, atomic file helpers shared by every stage.

Every artefact peel writes goes through here so that (a) a crash never leaves a half-written
file that a later run would trust, and (b) nothing is ever loaded with pickle: arrays are
``.npz`` read with ``allow_pickle=False`` or safetensors, metadata is JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import re
import stat
import tempfile
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from peel import __version__
from peel.errors import ConfigError, InputError, LockError, OutputError, PeelError

F = TypeVar("F", bound=Callable[..., Any])

#: Longest line a text reader accepts: real interaction rows are far shorter, and a cap keeps
#: memory bounded on a file without newlines (a binary file, /dev/zero copied to disk).
MAX_LINE_BYTES = 1 << 20
#: Largest JSON file read whole (run metadata, eval.json); bigger is not a peel file.
MAX_JSON_BYTES = 64 << 20
#: Deepest JSON nesting accepted; peel writes at most ~5 levels, and deep nesting would hit
#: Python's recursion limit inside the json module.
MAX_JSON_DEPTH = 64


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling path, renamed over ``path`` only if the block succeeds."""
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"{target}: is a folder; give a file name to write to")
    blocker = next((d for d in target.parents if d.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise OutputError(f"{blocker}: exists and is not a folder, so {target} cannot be "
                          "written; choose another output location")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as err:
        raise OutputError(f"{target}: cannot write ({err.strerror or err}); choose a writable "
                          "output location") from err
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def to_json(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(obj, indent=indent, default=_json_default, sort_keys=False)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, to_json(obj) + "\n")


def read_json(path: str | os.PathLike[str], max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file peel wrote; every failure is one :class:`InputError` naming the file."""
    return parse_json(read_text(path, max_bytes), str(path))


def parse_json(text: str, name: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` with a nesting limit checked first (deep nesting overflows the stack)."""
    depth = json_depth(text)
    if depth > max_depth:
        raise InputError(f"{name}: JSON nested {depth} levels deep (at most {max_depth}); this "
                         "is not a file peel wrote")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{name}:{err.lineno}: invalid JSON ({err.msg})") from err
    except RecursionError as err:  # pragma: no cover - json_depth catches this first
        raise InputError(f"{name}: JSON nested too deeply") from err


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def json_depth(text: str) -> int:
    """Deepest bracket nesting of a JSON text (strings ignored), in one vectorised pass."""
    bare = _JSON_STRING.sub("", text)
    codes = np.frombuffer(bare.encode("utf-8", "replace"), dtype=np.uint8)
    steps = ((codes == ord("[")) | (codes == ord("{"))).astype(np.int64) - (
        (codes == ord("]")) | (codes == ord("}")))
    return int(np.cumsum(steps).max(initial=0))


# ------------------------------------------------------------------ checked inputs and outputs


def check_input_file(path: str | os.PathLike[str], what: str = "input",
                     error: type[PeelError] = InputError) -> os.stat_result:
    """Refuse anything but a regular file before opening it.

    Opening a FIFO blocks until a writer appears and a character device such as /dev/zero
    never ends, so both are refused from ``stat`` alone, without opening. ``error`` is the
    class raised, so that e.g. the data readers keep raising their own ``DataError``.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise error(f"{p}: cannot read {what}: no such file") from None
    except OSError as err:
        raise error(f"{p}: cannot read {what} ({err.strerror or err})") from err
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{p}: is a folder; expected a file ({what})")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{p}: is a {_file_kind(st.st_mode)}, not a regular file; copy the "
                         f"{what} into an ordinary file first")
    return st


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))
    return next((name for test, name in kinds if test(mode)), "special file")


def read_text(path: str | os.PathLike[str], max_bytes: int, what: str = "file") -> str:
    """A whole small UTF-8 file (configs, JSON), refusing special and oversized files."""
    st = check_input_file(path, what)
    if st.st_size > max_bytes:
        raise InputError(f"{path}: {st.st_size:,} bytes, more than the {max_bytes:,} a {what} "
                         "may have; is this the right file?")
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as err:
        raise InputError(f"{path}: cannot read {what} ({err.strerror or err})") from err
    return decode_utf8(data, str(path))


def decode_utf8(data: bytes, name: str, lineno: int | None = None,
                error: type[PeelError] = InputError, first_line: int = 1) -> str:
    """UTF-8 text, or an error naming the file, the line and the offending byte.

    ``lineno`` names the line outright; otherwise it is counted from ``first_line``, the
    number of the line ``data`` starts with.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = lineno if lineno is not None else first_line + data.count(b"\n", 0, err.start)
        raise error(f"{name}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the "
                    "file as UTF-8") from None


_BOM = b"\xef\xbb\xbf"


def iter_lines(path: str | os.PathLike[str], what: str = "data file",
               max_line: int = MAX_LINE_BYTES, error: type[PeelError] = InputError,
               block: int = 1 << 16) -> Iterator[tuple[int, str]]:
    """Stream ``(line number, text without the newline)`` of a UTF-8 file in bounded memory.

    The file is read in ``block``-byte pieces, each decoded up to its last newline, so at most
    about ``block + max_line`` bytes (and one block's lines) are held however large the file
    is; a line that grows
    beyond ``max_line`` bytes without a newline is an error (a binary file, a data dump with no
    line breaks). A UTF-8 byte order mark at the start is dropped.
    """
    check_input_file(path, what, error)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed in finally, across yields
    except OSError as err:
        raise error(f"{path}: cannot read {what} ({err.strerror or err})") from err
    try:
        head = fh.read(len(_BOM))
        lineno, rest = 0, b"" if head == _BOM else head
        while data := fh.read(block):
            if len(rest) + len(data) > max_line and b"\n" not in data:
                line = lineno + 1  # fail before copying the over-long line again
            else:
                buf = rest + data
                cut = buf.rfind(b"\n") + 1
                rest = buf[cut:]
                line = lineno + buf.count(b"\n", 0, cut) + 1 if len(rest) > max_line else 0
            if line:
                raise error(f"{path}:{line}: line longer than {max_line:,} bytes; is this a "
                            f"text {what}?")
            if cut:
                lines = decode_utf8(buf[:cut], str(path), None, error, lineno + 1).split("\n")
                for text in lines[:-1]:
                    lineno += 1
                    yield lineno, text
        tail = decode_utf8(rest, str(path), None, error, lineno + 1).split("\n")
        for text in tail if tail[-1] else tail[:-1]:  # the last line, if it has no newline
            lineno += 1
            yield lineno, text
    except OSError as err:
        raise error(f"{path}: cannot read {what} ({err.strerror or err})") from err
    finally:
        fh.close()


def check_output_dir(path: str | os.PathLike[str], what: str = "--out") -> Path:
    """Create ``path`` if needed and prove it writable *before* long work starts.

    Without this, an unwritable or wrong ``--out`` failed only when the first result was
    written, possibly after hours of training or a whole evaluation.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{p}: exists and is not a folder; give {what} a new or existing "
                          "folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".peel-write-test.", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"{p}: cannot write there ({err.strerror or err}); choose a "
                          f"writable {what} folder") from err
    return p


# ------------------------------------------------------------------ one process per run folder


LOCK_NAME = ".peel.lock"


class RunLock:
    """Exclusive use of a run folder by one process, held for the life of a ``with`` block.

    Two ``peel train`` into one folder would both run every stage and overwrite each other's
    files. The lock is ``fcntl.flock`` on ``OUT/.peel.lock``, which the kernel releases when the
    holder dies however it dies (kill -9 included), so a lock left by a dead process is simply
    taken over; the file holds the holder's PID for the message. The file is never deleted
    (deleting a flock file lets two processes lock different inodes). Without ``fcntl`` (Windows)
    the file is created with O_EXCL instead and a lock whose PID is no longer alive is stale.
    """

    def __init__(self, out: str | os.PathLike[str], what: str = "--out") -> None:
        self.out = Path(out)
        self.what = what
        self.path = self.out / LOCK_NAME
        self._fd: int | None = None
        self._pidfile = False

    def __enter__(self) -> RunLock:
        check_output_dir(self.out, self.what)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on POSIX
            self._enter_pidfile()
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            self._refuse(holder)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        return self

    def _refuse(self, holder: str) -> typing.NoReturn:
        raise LockError(f"{self.out}: in use by another peel process (pid {holder or 'unknown'});"
                        f" wait for it to finish, or use another {self.what} folder")

    def _enter_pidfile(self) -> None:  # pragma: no cover - exercised on Windows only
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self.path.read_text(encoding="ascii", errors="replace").strip()
                if holder.isdigit() and _pid_alive(int(holder)):
                    self._refuse(holder)
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
            os.close(fd)
            self._pidfile = True
            return
        self._refuse("unknown")

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing releases the flock
            self._fd = None
        if self._pidfile:  # pragma: no cover - Windows
            self.path.unlink(missing_ok=True)
            self._pidfile = False


def _pid_alive(pid: int) -> bool:  # pragma: no cover - Windows fallback only
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def locked_run(param: str = "out") -> Callable[[F], F]:
    """Decorator: run the function holding :class:`RunLock` on its ``param`` argument."""

    def wrap(fn: F) -> F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with RunLock(sig.bind(*args, **kwargs).arguments[param]):
                return fn(*args, **kwargs)

        return typing.cast(F, run)

    return wrap


def save_npz(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> None:
    """Write arrays atomically; object arrays are refused so loading never needs pickle."""
    for name, arr in arrays.items():
        if np.asarray(arr).dtype == object:
            raise TypeError(f"array {name!r} has dtype object, which would need pickle")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()})


def load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def file_digest(path: str | os.PathLike[str], algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_metadata(command: str, config: Any, seed: int) -> dict[str, Any]:
    """What is written next to every run's outputs so a result can be traced and repeated."""
    import platform
    import sys

    return {
        "peel_version": __version__,
        "command": command,
        "seed": seed,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": np.__version__,
        "config": config,
    }


def write_run_metadata(out_dir: str | os.PathLike[str], command: str, config: Any,
                       seed: int) -> None:
    write_json(Path(out_dir) / "run.json", run_metadata(command, config, seed))


def dataclass_from_dict(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """Build a (possibly nested) dataclass, refusing unknown keys and wrongly typed values.

    Types are strict because TOML makes them explicit and a lenient reading silently changed
    runs: ``epochs = 2.5`` ran 3 epochs and ``epochs = true`` ran 1. So no bool for an int, no
    float for an int, no string for a number; an int is accepted for a float.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(fields)}"
        )
    hints = _type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        ftype = hints.get(name, fields[name].type)
        sub = _dataclass_type(ftype, cls)
        if sub is not None and isinstance(value, Mapping):
            kwargs[name] = dataclass_from_dict(sub, value, f"{where}.{name}")
        else:
            kwargs[name] = conform(value, ftype, f"{where}: {name}")
    return cls(**kwargs)


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # pragma: no cover - unresolvable annotation: no checking
        return {}


class _MismatchError(Exception):
    """Internal: a value does not fit a type (turned into a ConfigError by :func:`conform`)."""


def conform(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked (and normalised: list -> tuple, int -> float) against ``hint``."""
    try:
        return _conform(value, hint)
    except _MismatchError:
        raise ConfigError(f"{where} = {_show(value)}: expected {_type_name(hint)}") from None


def _conform(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _conform(value, arg)
            except _MismatchError:
                continue
        raise _MismatchError
    if origin is tuple:
        return _conform_tuple(value, args)
    if hint is bool:
        if not isinstance(value, bool):
            raise _MismatchError
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int) or abs(value) >= 2**63:
            raise _MismatchError
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _MismatchError
        if (isinstance(value, int) and abs(value) >= 2**63) or not math.isfinite(value):
            raise _MismatchError
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _MismatchError
        return value
    if isinstance(value, list):  # an unannotated sequence: keep the old list -> tuple rule
        return tuple(value)
    return value


def _conform_tuple(value: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise _MismatchError
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_conform(v, args[0]) for v in value)
    if args and len(args) != len(value):
        raise _MismatchError
    return tuple(_conform(v, a) for v, a in zip(value, args, strict=False)) if args else tuple(
        value)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" (or left out)" if type(None) in args else "")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}s"
        return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    return {bool: "true or false", int: "an integer (e.g. 3, not 3.0 or \"3\")",
            float: "a finite number (e.g. 0.5)", str: "a quoted string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _show(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _dataclass_type(ftype: Any, owner: type) -> type | None:
    if isinstance(ftype, str):
        import sys

        module = sys.modules[owner.__module__]
        ftype = getattr(module, ftype, None)
    if isinstance(ftype, type) and dataclasses.is_dataclass(ftype):
        return ftype
    return None

