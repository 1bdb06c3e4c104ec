"""``key=value`` overrides of configuration dataclasses: the one parser for ``--set`` and the
benchmarks.

Strict on purpose: a value that is not of the field's type is refused with one line naming the
key and the type, because a silently mis-read override (``true`` mistyped as ``ture`` read as
False, ``2.5`` truncated to 2) gives a run that looks fine and measures the wrong thing.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_INT_RE = re.compile(r"[+-]?\d+")


class OverrideError(ValueError):
    """An override that does not name a field or does not fit its type."""


def _kind_of(field: dataclasses.Field[Any], current: Any) -> tuple[str, bool]:
    """(base type name, accepts None) of a field: its annotation first (a ``float`` field
    whose default is written ``0`` still takes 0.1), else the type of its current value."""
    text = field.type if isinstance(field.type, str) else getattr(field.type, "__name__",
                                                                    str(field.type))
    optional = current is None or "None" in text or "Optional" in text
    if isinstance(current, tuple) or text.startswith("tuple"):
        inner = current[0] if current else None
        elem = _first_type(text.partition("[")[2], "")
        elem = elem or (type(inner).__name__ if inner is not None else "str")
        return f"tuple[{elem}]", optional
    kind = _first_type(text, "")
    if not kind:
        kind = type(current).__name__ if current is not None else "str"
    return kind, optional


def _first_type(annotation: str, default: str) -> str:
    for name in ("bool", "int", "float", "str"):
        if re.search(rf"\b{name}\b", annotation):
            return name
    return default


def parse_value(raw: str, kind: str, optional: bool, key: str) -> Any:
    """``raw`` as a value of ``kind`` (bool, int, float, str or tuple[...]), or an error."""
    text = raw.strip()
    if text.lower() == "none":
        if optional:
            return None
        if kind == "str":
            return text  # e.g. finetune.scale=none: a value, not a missing one
        raise OverrideError(f"override {key}={raw}: {key} cannot be none; expected {_a(kind)}")
    if kind.startswith("tuple["):
        elem = kind[6:-1]
        return tuple(parse_value(x, elem, False, key) for x in text.split(",") if x.strip())
    if kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
    elif kind == "int":
        if _INT_RE.fullmatch(text):
            return int(text)
    elif kind == "float":
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            return value
    else:
        return text
    raise OverrideError(f"override {key}={raw}: {raw!r} is not {_a(kind)}")


def _a(kind: str) -> str:
    return {"bool": "a bool (true or false)", "int": "an integer", "float": "a number",
            "str": "a string"}.get(kind, f"a comma list ({kind})")


def override_fields(obj: Any, pairs: Sequence[str], where: str = "") -> Any:
    """A copy of dataclass ``obj`` with ``key=value`` pairs applied (flat configs)."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    changes: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        name = f"{where}.{key}" if where else key
        if not sep:
            raise OverrideError(f"override {pair!r}: expected key=value")
        if key not in fields:
            raise OverrideError(f"override {pair!r}: {where or type(obj).__name__} has no key "
                                f"{key!r}; valid: {', '.join(fields)}")
        kind, optional = _kind_of(fields[key], getattr(obj, key))
        changes[key] = parse_value(raw, kind, optional, name)
    return dataclasses.replace(obj, **changes)


def apply_overrides(cfg: Any, pairs: Sequence[str]) -> Any:
    """A copy of a sectioned config (``RunConfig``) with ``section.key=value`` pairs applied."""
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        sect, dot, key = name.strip().partition(".")
        if not sep or not dot or not hasattr(cfg, sect):
            raise OverrideError(f"override {pair!r}: expected section.key=value, e.g. "
                                "groups.item_grouping=random")
        section = override_fields(getattr(cfg, sect), [f"{key}={raw}"], where=sect)
        cfg = dataclasses.replace(cfg, **{sect: section})
    return cfg
