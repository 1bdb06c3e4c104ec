"""Every decimal figure in the READMEs' tables must be in a committed results file.

    python benchmarks/check_figures.py [REPO]      # exit 1 and one line per unbacked figure

Checked: every decimal in the tables (lines starting with ``|``) and every decimal with four
or more places in the prose (metrics, as /work/shared/tools/unbacked-figures counts them),
outside code fences, of ``README.md``, whose files are everything committed under
``docs/results/``, and of each ``docs/results/<name>/README.md``, whose files are those
committed in its own folder and below. Results files are .json, .jsonl, .csv, .md and .txt
other than READMEs (what the scripts that measured write). A figure printed with k decimals
is backed when a number of a file rounds to it at k decimals (0.23086 backs 0.2309); signs
count (−0.007 needs -0.007).
"Committed" means listed by ``git ls-files`` (a folder outside git: every file on disk).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from pathlib import Path

SUFFIXES = {".json", ".jsonl", ".csv", ".md", ".txt"}
#: a decimal as a README prints it: optional sign (ASCII or Unicode minus), thousands commas
FIGURE = re.compile(r"(?<![\w.])([-+\u2212]?)(\d{1,3}(?:,\d{3})+|\d+)\.(\d+)(?![\w.])")
#: any number in a results file, integers and exponents included
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


#: decimals in prose with at least this many places are figures to check (0.1187, not 2.25)
PROSE_DECIMALS = 4


def figures(text: str) -> list[tuple[int, str]]:
    """(line number, figure as printed): every decimal of the Markdown tables of ``text`` and
    the prose's decimals with >= PROSE_DECIMALS places; code fences are skipped."""
    out = []
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        table = line.lstrip().startswith("|")
        for m in FIGURE.finditer(line):
            if table or len(m.group(3)) >= PROSE_DECIMALS:
                out.append((n, m.group(0)))
    return out


def _value(figure: str) -> tuple[Decimal, int]:
    """The figure's exact value and its number of decimals."""
    m = FIGURE.fullmatch(figure)
    assert m is not None
    sign = -1 if m.group(1) in ("-", "\u2212") else 1
    whole = m.group(2).replace(",", "")
    return sign * Decimal(f"{whole}.{m.group(3)}"), len(m.group(3))


def file_numbers(texts: Iterable[str]) -> list[Decimal]:
    """Every number of the files, exact (Decimal: a decimal string is exact in it, and it is
    many times faster to build than a Fraction, which made the check take minutes)."""
    values = set()
    for text in texts:
        for m in NUMBER.finditer(text):
            try:
                values.add(Decimal(m.group(0)))
            except InvalidOperation:
                continue
    return sorted(values)


def backed(figure: str, numbers: list[Decimal]) -> bool:
    """Some file number lies within half a unit of the figure's last printed decimal."""
    import bisect

    value, decimals = _value(figure)
    half = Decimal(5).scaleb(-(decimals + 1))
    i = bisect.bisect_left(numbers, value - half)
    return i < len(numbers) and numbers[i] <= value + half


def committed(root: Path) -> list[Path]:
    """Files git tracks under ``root`` (every file when ``root`` is not in a git tree)."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], check=True,
                             capture_output=True).stdout.decode()
        return [root / p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        return [p for p in root.rglob("*") if p.is_file()]


def results_texts(files: list[Path], folder: Path) -> list[str]:
    return [p.read_text(errors="ignore") for p in files
            if p.suffix in SUFFIXES and p.name != "README.md" and folder in p.parents
            and p.exists()]


def unbacked(root: Path) -> list[str]:
    """``README:line: figure`` for every figure that no results file holds."""
    root = root.resolve()
    files = committed(root)
    results = root / "docs" / "results"
    targets = [(root / "README.md", results)]
    targets += [(p, p.parent) for p in sorted(results.glob("*/README.md"))]
    out = []
    for readme, folder in targets:
        if not readme.exists():
            continue
        numbers = file_numbers(results_texts(files, folder))
        for line, figure in figures(readme.read_text()):
            if not backed(figure, numbers):
                out.append(f"{readme.relative_to(root)}:{line}: {figure}")
    return out


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    missing = unbacked(root)
    for line in missing:
        print(line)
    print(f"{len(missing)} figure(s) without a results file behind them", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
