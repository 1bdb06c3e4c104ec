"""Regression tests for issue 15: bad or unusual inputs end in one clean message, never a
traceback, a hang, unbounded memory, a silently wrong result or an orphaned worker.

Grouped like the issue: (3) workers and run-folder lock, (4) tracebacks, (5) hangs and memory,
(7) silently accepted input, (8) unhelpful messages. Each test failed on the code before the
fix (a traceback, a hang caught by a timeout, a wrong exit status, or a leaked process).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from peel.budget import MAX_BUDGET_BYTES, PREAMBLE, BudgetError, parse_budget
from peel.cli import main
from peel.data import DataConfig, DataError, load_dataset
from peel.device import PackageError, open_package, read_package
from peel.errors import ConfigError, LockError, OutputError, PeelError
from peel.io import RunLock, dataclass_from_dict, iter_lines
from peel.package import build_package, synthetic_group
from peel.pipeline import RunConfig, load_config
from peel.synthetic import SyntheticConfig, make_demo, write_lightgcn_folder

TINY_CONFIG = """
[run]
workers = 1

[pretrain]
dim = 16
block_dim = 8
layers = 1
epochs = 1
batch_size = 2048
patience = 1

[groups]
n_user_groups = 2
n_item_groups = 2

[finetune]
n_blocks = 2
block_dim = 8
max_epochs = 1
patience = 1
eval_users = 50

[deploy]
budgets = ["0.5"]
baselines = []
"""


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_clean(code: int, err: str, *needles: str) -> None:
    """Exit status 2, one line on stderr, no traceback, and every needle in the message."""
    assert code == 2, err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny LightGCN folder and a TOML config that trains on it in seconds."""
    root = tmp_path_factory.mktemp("rel")
    data = make_demo(SyntheticConfig(n_users=60, n_items=40, n_communities=2, n_topics=4,
                                     mean_interactions=10, seed=1))
    write_lightgcn_folder(data, str(root / "data"))
    (root / "cfg.toml").write_text(TINY_CONFIG)
    return root / "data", root / "cfg.toml"


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pkg")
    group = synthetic_group(n_items=200, n_blocks=4, block_dim=4, n_item_groups=3, n_users=3)
    path = root / "user.peel"
    build_package(path, group, 1.0, user=1)
    return path


def resign(data: bytearray) -> bytes:
    """Recompute a package's sha256 after editing it, as a tampering tool would."""
    digest = hashlib.sha256(bytes(data[:32]))
    digest.update(bytes(data[64:]))
    data[32:64] = digest.digest()
    return bytes(data)


# --------------------------------------------------------------------------- 3: lock, workers


def test_run_lock_refuses_a_second_holder_and_names_its_pid(tmp_path: Path) -> None:
    with RunLock(tmp_path / "run"), pytest.raises(LockError, match=rf"pid {os.getpid()}"):
        RunLock(tmp_path / "run").__enter__()
    with RunLock(tmp_path / "run"):  # released on exit
        pass


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import time
        from peel.io import RunLock
        with RunLock({str(tmp_path / "run")!r}):
            print("locked", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(LockError, match=rf"pid {proc.pid}"):
            RunLock(tmp_path / "run").__enter__()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert (tmp_path / "run" / ".peel.lock").read_text().strip() == str(proc.pid)
    with RunLock(tmp_path / "run"):
        assert (tmp_path / "run" / ".peel.lock").read_text().strip() == str(os.getpid())


def test_second_train_into_the_same_out_is_refused(capsys, tmp_path, tiny) -> None:
    data, cfg = tiny
    with RunLock(tmp_path / "run"):
        code, _, err = cli(capsys, "train", data, "--out", tmp_path / "run", "--config", cfg,
                           "--quiet")
    assert_clean(code, err, "in use", f"pid {os.getpid()}")
    assert not (tmp_path / "run" / "pretrain").exists()


def _alive(pid: int) -> bool:
    """Running (not a zombie nobody reaped)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return "\nState:\tZ" not in status


def test_workers_die_when_the_parent_is_killed(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import time
        from peel.executor import ProcessExecutor

        if __name__ == "__main__":
            ex = ProcessExecutor(2, threads_per_worker=1, progress=False).__enter__()
            pool = ex._pool
            list(pool.map(time.sleep, [2, 2]))  # both workers started and initialised
            print(" ".join(str(p) for p in pool._processes), flush=True)
            futures = [pool.submit(time.sleep, 300) for _ in range(2)]
            time.sleep(300)
    """)
    (tmp_path / "parent.py").write_text(script)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")],
                            stdout=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        assert proc.stdout is not None
        workers = [int(p) for p in proc.stdout.readline().split()]
        assert workers and all(_alive(p) for p in workers)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.2)
        leaked = [p for p in workers if _alive(p)]
        assert not leaked, f"workers {leaked} outlived their killed parent"
    finally:
        proc.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- 4: tracebacks


@pytest.mark.parametrize("command", ["train", "pretrain", "report", "evaluate"])
def test_out_that_is_an_existing_file(capsys, tmp_path, tiny, command) -> None:
    data, cfg = tiny
    target = tmp_path / "taken"
    target.write_text("not a folder")
    argv = {
        "train": ["train", data, "--out", target, "--config", cfg, "--quiet"],
        "pretrain": ["pretrain", data, "--out", target, "--config", cfg, "--quiet"],
        "report": ["report", tmp_path, "--out", target],
        "evaluate": ["evaluate", target, "--quiet"],
    }[command]
    code, _, err = cli(capsys, *argv)
    assert_clean(code, err, str(target))


def test_out_below_a_file_is_refused_before_work(capsys, tmp_path, tiny) -> None:
    data, cfg = tiny
    (tmp_path / "f").write_text("")
    code, _, err = cli(capsys, "train", data, "--out", tmp_path / "f" / "run", "--config", cfg,
                       "--quiet")
    assert_clean(code, err, str(tmp_path / "f" / "run"), "--out")


def test_evaluate_checks_the_run_folder_is_writable_before_the_work(
        capsys, tmp_path, monkeypatch) -> None:
    import tempfile

    import peel.pipeline

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(peel.pipeline.config_toml(RunConfig()))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    def work(*args, **kwargs):
        raise AssertionError("evaluation ran before the run folder was checked")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    monkeypatch.setattr(peel.pipeline, "load_data", work)
    code, _, err = cli(capsys, "evaluate", run, "--quiet")
    assert_clean(code, err, str(run), "Permission denied")


@pytest.mark.parametrize(("toml", "needles"), [
    ('[groups]\nn_user_groups = "six"\n', ["[groups]", "n_user_groups", "integer"]),
    ('[run]\nworkers = "two"\n', ["[run]", "workers", "integer"]),
    ("[pretrain]\nepochs = 2.5\n", ["[pretrain]", "epochs", "2.5", "integer"]),
    ("[pretrain]\nepochs = true\n", ["[pretrain]", "epochs", "true", "integer"]),
    ("[pretrain]\nlr = \"fast\"\n", ["[pretrain]", "lr", "number"]),
    ("[groups]\nnormalize = 1\n", ["[groups]", "normalize", "true or false"]),
    ('[deploy]\nbudgets = "0.5"\n', ["[deploy]", "budgets", "list"]),
    ("[deploy]\nbudgets = [0.5]\n", ["[deploy]", "budgets", "list of"]),
    ("[data]\nsplit_ratios = [0.7, 0.3]\n", ["[data]", "split_ratios", "3 values"]),
    ("[pretrain]\nseed = 1e20\n", ["[pretrain]", "seed", "integer"]),
    ("[pretrain]\nseed = 100000000000000000000\n", ["[pretrain]", "seed"]),
    ("[pretrain]\nlr = nan\n", ["[pretrain]", "lr", "finite"]),
])
def test_config_types_are_strict(capsys, tmp_path, toml, needles) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    for needle in [str(cfg), *needles]:
        assert needle in str(info.value), (needle, str(info.value))
    code, _, err = cli(capsys, "train", "demo", "--out", tmp_path / "r", "--config", cfg)
    assert_clean(code, err, str(cfg))


def test_config_accepts_ints_for_floats_and_lists_for_tuples(tmp_path: Path) -> None:
    cfg = tmp_path / "ok.toml"
    cfg.write_text('[pretrain]\nlr = 1\nmax_minutes = 2\n[deploy]\nbudgets = ["0.2"]\n'
                   "[finetune]\nearly_stop_budgets = [1, 0.5]\n")
    run = load_config(cfg)
    assert run.pretrain.lr == 1.0 and isinstance(run.pretrain.lr, float)
    assert run.pretrain.max_minutes == 2.0 and run.deploy.budgets == ("0.2",)
    assert run.finetune.early_stop_budgets == (1.0, 0.5)


def test_dataclass_from_dict_names_where() -> None:
    with pytest.raises(ConfigError, match=r"cfg.toml \[data\]: min_user_interactions = 1.5"):
        dataclass_from_dict(DataConfig, {"min_user_interactions": 1.5}, "cfg.toml [data]")


@pytest.mark.parametrize("text", ["18446744073709551616", "20000000000000000000GB",
                                  str(2**63)])
def test_budgets_beyond_64_bits(text: str) -> None:
    with pytest.raises(BudgetError, match="largest supported"):
        parse_budget(text)
    assert parse_budget(str(MAX_BUDGET_BYTES)) == MAX_BUDGET_BYTES


def test_shrink_with_a_huge_budget_is_a_message(capsys, tmp_path, package) -> None:
    code, _, err = cli(capsys, "shrink", package, "--budget", "18446744073709551616",
                       "--out", tmp_path / "s.peel")
    assert code == 2 and "Traceback" not in err and "largest supported" in err


@pytest.mark.parametrize(("line", "needle"), [
    ("0 1 \u00b2\n", "non-integer id"),  # superscript two: isdigit() but not an int
    ("0 1 \u0663\n", "non-integer id"),  # Arabic-Indic three
    ("0 1 12345678901234567890\n", "12345678901234567890"),
    ("0 1 -99999999999999999999\n", "-99999999999999999999 is larger"),
])
def test_lightgcn_ids_must_be_ascii_int64(tmp_path: Path, line: str, needle: str) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "train.txt").write_text("1 2 3\n" + line, encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.txt:2") as info:
        load_dataset(folder, cache_dir=False)
    assert needle in str(info.value)


def test_train_txt_that_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "d" / "train.txt").mkdir(parents=True)
    with pytest.raises(DataError, match=r"train.txt: is a folder"):
        load_dataset(tmp_path / "d", cache_dir=False)


def _package_bytes(header: bytes, payload: bytes = b"") -> bytes:
    data_start = 64 + -(-len(header) // 64) * 64
    body = header + b" " * (data_start - 64 - len(header)) + payload
    pre = bytearray(PREAMBLE.pack(b"PEELPKG\x00", 3, len(header), len(payload), 1000,
                                  bytes(32)))
    return resign(pre + body)


def test_package_header_nested_100k_deep(tmp_path: Path) -> None:
    blob = _package_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(PackageError, match="nested deeper"):
        read_package(blob, "deep.peel")
    (tmp_path / "deep.peel").write_bytes(blob)
    with pytest.raises(PackageError):
        open_package(tmp_path / "deep.peel")


def test_package_header_size_is_limited() -> None:
    blob = bytearray(_package_bytes(b"{}"))
    blob[12:16] = (1 << 30).to_bytes(4, "little")
    with pytest.raises(PackageError, match="header of"):
        read_package(bytes(blob), "huge.peel", verify=False)


def test_recommend_exclude_with_a_huge_id(capsys, package) -> None:
    code, _, err = cli(capsys, "recommend", package, "--exclude", "1," + "9" * 30)
    assert code == 2 and "--exclude" in err and "Traceback" not in err


@pytest.mark.parametrize("doc", [
    [], {"rows": 3}, {"dataset": "d", "full_table_bytes": 10},
    {"dataset": "d", "full_table_bytes": 10, "rows": [{"method": "PEEL"}]},
    {"dataset": "d", "full_table_bytes": 10, "rows": [
        {"method": "PEEL", "budget": "0.5", "budget_bytes": 5, "bytes_used": 5,
         "metrics": {"recall@20": "high"}}]},
    {"dataset": 3, "full_table_bytes": 10, "rows": []},
])
def test_report_on_a_malformed_eval_json(capsys, tmp_path, doc) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps(doc))
    code, _, err = cli(capsys, "report", run, "--out", tmp_path / "rep")
    assert_clean(code, err, "eval.json")


def test_report_on_eval_json_that_is_not_json(capsys, tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.json").write_bytes(b"[" * 100_000)
    code, _, err = cli(capsys, "report", run, "--out", tmp_path / "rep")
    assert_clean(code, err, "eval.json")


# --------------------------------------------------------------------------- 5: hangs, memory


def _run_cli(*argv: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "peel.cli", *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_fifo_as_data_or_package_is_refused_not_a_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for argv in (["data", "stats", fifo, "--no-cache"], ["recommend", fifo],
                 ["train", "demo", "--out", tmp_path / "r", "--config", fifo]):
        proc = _run_cli(*argv)
        assert proc.returncode == 2 and "FIFO" in proc.stderr, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_dev_zero_as_data_is_refused_at_once() -> None:
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="character device"):
        load_dataset("/dev/zero", cache_dir=False)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(PackageError, match="character device"):
        open_package("/dev/zero")


def test_a_huge_line_costs_bounded_memory(tmp_path: Path) -> None:
    big = tmp_path / "big.csv"
    with open(big, "wb") as fh:
        for _ in range(8):
            fh.write(b"x" * (1 << 20))  # 8 MB without a newline
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"big.csv:1: line longer than"):
            load_dataset(big, cache_dir=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak / 1e6:.1f} MB reading an 8 MB line"


def test_delimited_reader_streams(tmp_path: Path) -> None:
    """Reading a 4 MB file must not hold the whole text (the old reader read() it whole and
    then split it into a list of lines)."""
    path = tmp_path / "rows.csv"
    rows = [f"user{u % 500},item{(u * 7) % 300},{u % 5 + 1}" for u in range(200_000)]
    path.write_text("user,item,rating\n" + "\n".join(rows) + "\n")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        lines = sum(1 for _ in iter_lines(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lines == 200_001 and peak < size / 4


# --------------------------------------------------------------------------- 7: silent input


def test_nan_in_resigned_package_blocks_is_refused(capsys, tmp_path, package) -> None:
    pkg = open_package(package)
    blocks = pkg.layout.slot("blocks")
    assert blocks is not None
    data = bytearray(package.read_bytes())
    at = pkg.layout.data_start + blocks.offset
    data[at: at + 4] = np.float32(np.nan).tobytes()
    bad = tmp_path / "nan.peel"
    bad.write_bytes(resign(data))
    with pytest.raises(PackageError, match="finite"):
        open_package(bad)
    data[at: at + 4] = np.float32(np.inf).tobytes()
    bad.write_bytes(resign(data))
    for argv in (["recommend", bad], ["shrink", bad, "--budget", "0.5", "--out",
                                      tmp_path / "s.peel"]):
        code, _, err = cli(capsys, *argv)
        assert code == 2 and "finite" in err and "Traceback" not in err
    assert not (tmp_path / "s.peel").exists()


def test_rating_threshold_nan_is_an_error(capsys, tmp_path) -> None:
    f = tmp_path / "r.csv"
    f.write_text("user,item,rating\n1,2,5\n1,3,4\n2,3,5\n")
    code, _, err = cli(capsys, "data", "stats", f, "--no-cache", "--rating-threshold", "nan")
    assert_clean(code, err, "rating threshold", "finite")


def test_nan_rating_in_a_row_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "r.csv"
    f.write_text("user,item,rating\n1,2,5\n1,3,nan\n")
    with pytest.raises(DataError, match=r"r.csv:3: rating 'nan' is not a finite number"):
        load_dataset(f, DataConfig(rating_threshold=4), cache_dir=False)


@pytest.mark.parametrize(("text", "needle"), [
    ("user,item\n1,2,3\n", "r.csv:2: expected 2 columns"),
    ("1,2,5,100,extra\n1,3,4,101,extra\n", "r.csv:1: 5 columns but no header"),
    ("user,item,rating\n1,2,5\n1,3,4,9\n", "r.csv:3: expected 3 columns"),
])
def test_extra_csv_columns_are_an_error(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "r.csv"
    f.write_text(text)
    with pytest.raises(DataError, match=needle):
        load_dataset(f, cache_dir=False)


def test_skip_column_reads_extra_columns(tmp_path: Path) -> None:
    f = tmp_path / "r.csv"
    f.write_text("1,2,x\n1,3,y\n2,3,z\n")
    data = load_dataset(f, DataConfig(columns=("user", "item", "skip")), cache_dir=False)
    assert data.stats()["interactions"] == 3


def test_split_files_on_one_csv_is_an_error(capsys, tmp_path) -> None:
    f = tmp_path / "r.csv"
    f.write_text("user,item\n1,2\n1,3\n")
    code, _, err = cli(capsys, "data", "stats", f, "--no-cache", "--split", "files")
    assert_clean(code, err, "--split files", "--split random")


# --------------------------------------------------------------------------- 8: messages


def test_non_utf8_data_names_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "r.csv"
    f.write_bytes(b"user,item\n1,2\n\xf8,3\n")
    with pytest.raises(DataError, match=r"r.csv:3: not UTF-8 text \(byte 0xf8\)"):
        load_dataset(f, cache_dir=False)


def test_non_utf8_config_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_bytes(b"[run]\nlabel = \"\xf8\"\n")
    with pytest.raises(PeelError, match=r"c.toml:2: not UTF-8"):
        load_config(f)


def test_format_lightgcn_on_a_csv(capsys, tmp_path) -> None:
    f = tmp_path / "r.csv"
    f.write_text("user,item\n1,2\n")
    code, _, err = cli(capsys, "data", "stats", f, "--no-cache", "--format", "lightgcn")
    assert_clean(code, err, "--format lightgcn needs a folder", "--format delimited")


def test_format_delimited_on_a_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is a folder"):
        load_dataset(tmp_path, DataConfig(fmt="delimited"), cache_dir=False)


def test_seed_beyond_64_bits(capsys, tmp_path) -> None:
    code, _, err = cli(capsys, "pretrain", "demo", "--out", tmp_path / "r", "--seed",
                       "100000000000000000000", "--quiet")
    assert_clean(code, err, "seed", "2^63")


def test_output_errors_are_value_errors() -> None:
    """New error classes stay catchable as ValueError, as every caller catches today."""
    for cls in (PeelError, ConfigError, OutputError, LockError, DataError, PackageError,
                BudgetError):
        assert issubclass(cls, ValueError) and issubclass(cls, PeelError)


@pytest.mark.parametrize("content", [
    b"", b"a", b"a\n", b"\n\n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\n", b"ab\nc",
    b"\xef\xbb\xbfa\r\nb\n\nc", b"x\n" * 5, ("\u00e9" * 10 + "\n").encode() * 3,
])
@pytest.mark.parametrize("block", [1, 2, 3, 1 << 16])
def test_iter_lines_matches_reading_whole(tmp_path: Path, content: bytes, block: int) -> None:
    """Block-wise streaming gives the same lines as decoding the whole file, at any block size
    (blocks that split a line, a UTF-8 character or the byte order mark)."""
    path = tmp_path / "t.txt"
    path.write_bytes(content)
    want = content.decode("utf-8-sig").split("\n")
    want = want[:-1] if want[-1] == "" else want
    assert list(iter_lines(path, block=block, max_line=100)) == list(enumerate(want, 1))


def test_iter_lines_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes(b"ok\nok\n" + b"z" * 300)
    with pytest.raises(PeelError, match=r"t\.txt:3: line longer than 100 bytes"):
        list(iter_lines(path, block=7, max_line=100))
    path.write_bytes(b"ok\n\xf8\n")
    with pytest.raises(PeelError, match=r"t\.txt:2: not UTF-8 text \(byte 0xf8\)"):
        list(iter_lines(path, block=2))


def test_demo_seed_that_is_not_a_number_is_one_clean_error() -> None:
    from peel.errors import ConfigError
    from peel.pipeline import resolve_data

    with pytest.raises(ConfigError, match="demo seed must be a non-negative integer"):
        resolve_data("demo:abc")
