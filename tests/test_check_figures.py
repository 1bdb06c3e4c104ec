"""benchmarks/check_figures.py: every figure the READMEs quote is in a committed results file."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_figures",
                                               ROOT / "benchmarks" / "check_figures.py")
assert _spec is not None and _spec.loader is not None
check_figures = importlib.util.module_from_spec(_spec)
sys.modules["check_figures"] = check_figures
_spec.loader.exec_module(check_figures)


def test_every_readme_figure_of_the_repository_is_backed() -> None:
    missing = check_figures.unbacked(ROOT)
    assert missing == [], "\n".join(missing)


def test_the_script_exits_1_and_names_what_is_unbacked(tmp_path: Path) -> None:
    folder = tmp_path / "docs" / "results" / "toy"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text('{"r": 0.12341, "d": 0.007, "s": 253.577}')
    (folder / "README.md").write_text(
        "| method | R@20 |\n|---|---|\n| A | **0.1234** / 253.6 |\n| B | 0.5555 |\n"
        "| C | −0.007 |\n| D | +0.007 |\n\n"
        "Prose: 0.9876 is checked, 0.98 is not.\n```\n| E | 0.4444 |\n```\n")
    (tmp_path / "README.md").write_text("| top | 0.1234 | 0.3333 |\n")
    missing = check_figures.unbacked(tmp_path)
    assert missing == ["README.md:1: 0.3333",
                       "docs/results/toy/README.md:4: 0.5555",
                       "docs/results/toy/README.md:5: −0.007",
                       "docs/results/toy/README.md:8: 0.9876"]
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "check_figures.py"),
                          str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 1 and "0.5555" in run.stdout


def test_only_committed_files_back_figures(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    folder = tmp_path / "docs" / "results" / "toy"
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("| A | 0.4321 |\n")
    (folder / "results.csv").write_text("a,0.4321\n")
    assert check_figures.unbacked(tmp_path) == ["docs/results/toy/README.md:1: 0.4321"]
    subprocess.run(["git", "-C", str(tmp_path), "add", "."], check=True)
    assert check_figures.unbacked(tmp_path) == []
