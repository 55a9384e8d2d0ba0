"""Config trees as TOML reads them (nested dicts): merged, edited by dotted key, and written back."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from typing import Any

import tomli_w


def dump_toml(tree: Mapping[str, Any]) -> str:
    return tomli_w.dumps(_drop_none(tree))



def _drop_none(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value



def deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: tables merge key by key (a child's ``{}`` keeps every parent key; list the
    table in the child's ``replace`` to drop them), any other value replaces the base's."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged



def drop_dotted(tree: dict[str, Any], dotted: str) -> None:
    """Remove ``a.b.c`` from ``tree`` (nothing when it is absent): the parent's value is not inherited."""
    *parents, leaf = dotted.split(".")
    node: Any = tree
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(leaf, None)



def set_dotted(tree: dict[str, Any], dotted: str, value: Any, *, keep: bool = False) -> None:
    """``tree[a][b][c] = value`` for ``a.b.c``, making the tables on the way (``keep``: a value there wins)."""
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        child = node[part] = dict(child) if isinstance(child, dict) else {}
        node = child
    if not keep or leaf not in node:
        node[leaf] = value



def parse_value(text: str) -> Any:
    """A TOML value (``1e-4``, ``true``, ``[1, 2]``, ``"x"``); anything else is a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
