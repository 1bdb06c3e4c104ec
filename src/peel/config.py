"""TOML configuration: one file holds every hyper-parameter, one section per stage.

There is no global config object: the loader returns plain dataclass instances that callers pass
explicitly to each stage, and every run writes the resolved values next to its outputs.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from peel.errors import ConfigError
from peel.io import dataclass_from_dict, read_text

#: A config is a few hundred bytes; anything this large is the wrong file.
MAX_CONFIG_BYTES = 1 << 20

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; syntax errors name the file and line."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: config file not found")
    text = read_text(p, MAX_CONFIG_BYTES, "config file")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{p}: invalid TOML: {err}") from err
    except RecursionError:
        raise ConfigError(f"{p}: invalid TOML: nested too deeply") from None


def section(doc: Mapping[str, Any], name: str, cls: type, where: str) -> Any:
    """Build ``cls`` from table ``name`` of a parsed TOML document (missing table = defaults)."""
    table = doc.get(name, {})
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: [{name}] must be a table")
    return dataclass_from_dict(cls, table, f"{where} [{name}]")


def check_sections(doc: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; valid: {sorted(known)}")


def to_toml(sections: Mapping[str, Any]) -> str:
    """Write dataclass sections as TOML (scalars, strings, lists and None-as-omitted)."""
    lines: list[str] = []
    for name, obj in sections.items():
        values = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
        lines.append(f"[{name}]")
        for key, value in values.items():
            if value is None:
                lines.append(f"# {key} = (unset)")
                continue
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\t", "\\t")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
