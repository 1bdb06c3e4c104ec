"""The distribution builds as `peel-rec` (wheel and sdist) and ships the `peel` package."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = """
import sys
from setuptools import build_meta as backend
out = sys.argv[1]
print(backend.build_sdist(out))
print(backend.build_wheel(out))
"""


def test_wheel_and_sdist_build(tmp_path: Path) -> None:
    """PEP 517 hooks called directly (what `python -m build --no-isolation` does), on a copy
    of the sources so the checkout gets no build/ or egg-info folders."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(ROOT / "src", src / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    out = tmp_path / "dist"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", BUILD, str(out)], cwd=src,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheels = list(out.glob("peel_rec-*.whl"))
    sdists = list(out.glob("peel_rec-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    with zipfile.ZipFile(wheels[0]) as whl:
        names = whl.namelist()
        assert "peel/__init__.py" in names and "peel/baselines/base.py" in names
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        assert "Name: peel-rec" in whl.read(meta).decode()
        entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "peel = peel.cli:main" in whl.read(entry).decode()
