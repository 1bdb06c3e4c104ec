"""The README's Python quick start runs as written, and docs/api.md covers every public name."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import peel

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.DOTALL)


def test_readme_python_quick_start_runs_as_written(tmp_path: Path) -> None:
    """Exactly the first ```python block of README.md, in a fresh interpreter, then the
    examples of docs/api.md on the run it made (they reuse runs/quickstart)."""
    quick = python_blocks(ROOT / "README.md")[0]
    (tmp_path / "quick.py").write_text(quick)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "quick.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seconds = time.perf_counter() - t0
    assert "lightgcn-svd" in proc.stdout and "PEEL" in proc.stdout
    assert (tmp_path / "runs" / "quickstart" / "eval.json").exists()
    print(f"README quick start: {seconds:.0f}s")
    docs = "\n".join(python_blocks(ROOT / "docs" / "api.md"))
    (tmp_path / "docs.py").write_text(docs)
    proc = subprocess.run([sys.executable, "docs.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_api_docs_cover_every_public_name() -> None:
    text = "\n".join(python_blocks(ROOT / "docs" / "api.md"))
    missing = [name for name in peel.__all__
               if name != "__version__" and not re.search(rf"\bpeel\.{name}\b", text)]
    assert not missing, f"docs/api.md has no example using {missing}"
