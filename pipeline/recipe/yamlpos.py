"""YAML loading that remembers where every value came from.

`yaml.safe_load` forgets line numbers; error messages need them. We compose
the node tree with the safe loader, construct the plain value from it, and
walk the nodes in parallel to record `path -> Location` for every mapping key
and sequence item. Duplicate keys, which YAML silently collapses, are errors.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.engine.errors import RecipeError

FieldPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Location:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


def format_path(path: FieldPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def load_located(file: Path, shown_as: str) -> tuple[Any, dict[FieldPath, Location]]:
    """Parse one YAML file safely; return (value, {field path: location})."""
    text = file.read_text(encoding="utf-8")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        value = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise RecipeError(f"{shown_as}:{line}: invalid YAML: {e.problem or e}") from None
    finally:
        loader.dispose()
    positions: dict[FieldPath, Location] = {}
    if node is not None:
        _walk(node, (), shown_as, positions)
    return value, positions


def _walk(node: yaml.Node, path: FieldPath, shown_as: str, out: dict[FieldPath, Location]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                raise RecipeError(
                    f"{shown_as}:{line}: {format_path(path + (key,))}: duplicate key "
                    f"(first at line {seen[key]})"
                )
            seen[key] = line
            out[path + (key,)] = Location(shown_as, line)
            _walk(value_node, path + (key,), shown_as, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[path + (i,)] = Location(shown_as, item.start_mark.line + 1)
            _walk(item, path + (i,), shown_as, out)


def deep_merge(
    base: Any, over: Any, base_pos: dict[FieldPath, Location], over_pos: dict[FieldPath, Location]
) -> tuple[Any, dict[FieldPath, Location]]:
    """Merge `over` onto `base` (mappings recursively, anything else replaced).

    Locations follow the values: a field keeps the line of the file that set it.
    """
    merged = _merge(base, over)
    positions = {p: loc for p, loc in base_pos.items() if _has_path(merged, p)}
    positions.update(over_pos)
    return merged, positions


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base[k], v) if k in base else v
        return out
    return over


def _has_path(value: Any, path: FieldPath) -> bool:
    for part in path:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and part < len(value):
            value = value[part]
        else:
            return False
    return True
