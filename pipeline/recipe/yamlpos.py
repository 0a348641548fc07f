"""YAML loading that remembers where every value came from.

`yaml.safe_load` forgets line numbers; error messages need them. We compose
the node tree with the safe loader, construct the plain value from it, and
walk the nodes in parallel to record `path -> Location` for every mapping key
and sequence item. Duplicate keys, which YAML silently collapses, are errors.

Recipes are small data, and reading one must stay cheap whatever it holds: the
file's size, the nesting depth (checked while composing, before Python's
recursion limit), the number of aliases and the number of nodes once aliases
are expanded (counted on the node graph, never by expanding it: a 2 KB file of
nested aliases expands to billions) are bounded before anything is built from
the document, and every failure is `file:line: ...`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.engine.errors import RecipeError

FieldPath = tuple[str | int, ...]

MAX_BYTES = 256 * 1024   # a recipe, target or scheme file; the shipped ones are under 2 KB
MAX_DEPTH = 24           # nested mappings/sequences
MAX_ALIASES = 64         # `*name` references
MAX_NODES = 20_000       # scalars, mappings and sequences, aliases expanded


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


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader, refusing deep nesting and many aliases while it composes."""

    def __init__(self, text: str, shown_as: str) -> None:
        super().__init__(text)
        self.shown_as, self.depth, self.aliases = shown_as, 0, 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise RecipeError(f"{self.shown_as}:{line}: more than {MAX_ALIASES} YAML aliases; "
                                  "a recipe is plain data (share settings with `extends:`)")
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise RecipeError(f"{self.shown_as}:{line}: nested deeper than {MAX_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _decoded(file: Path, shown_as: str) -> str:
    size = file.stat().st_size
    if size > MAX_BYTES:
        raise RecipeError(f"{shown_as}:1: {size} bytes; a recipe file may hold at most {MAX_BYTES}")
    data = file.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise RecipeError(f"{shown_as}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def expanded_size(node: yaml.Node, budget: int) -> int:
    """Nodes in the document with aliases expanded, counted over the shared node graph (each
    distinct node once, memoized), stopping as soon as the count passes `budget`."""
    sizes: dict[int, int] = {}

    def size(n: yaml.Node, depth: int = 0) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if depth > MAX_DEPTH or not isinstance(n, yaml.CollectionNode):
            total = 1  # deeper is refused while composing; a cycle is refused by the composer
        elif isinstance(n, yaml.MappingNode):
            total = 1 + sum(size(k, depth + 1) + size(v, depth + 1) for k, v in n.value)
        else:
            total = 1 + sum(size(item, depth + 1) for item in n.value)
        sizes[id(n)] = min(total, budget + 1)
        return sizes[id(n)]

    return size(node)


def load_located(file: Path, shown_as: str) -> tuple[Any, dict[FieldPath, Location]]:
    """Parse one YAML file safely and within bounds; return (value, {field path: location})."""
    text = _decoded(file, shown_as)
    try:
        loader = _BoundedLoader(text, shown_as)  # the reader refuses control characters here
    except yaml.reader.ReaderError as e:
        raise RecipeError(f"{shown_as}:{text[:e.position].count(chr(10)) + 1}: invalid YAML: {e.reason} "
                          f"(character U+{ord(e.character) if isinstance(e.character, str) else e.character:04X})") from None
    try:
        node = loader.get_single_node()
        if node is not None and expanded_size(node, MAX_NODES) > MAX_NODES:
            raise RecipeError(f"{shown_as}:1: more than {MAX_NODES} values once its aliases are expanded")
        value = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise RecipeError(f"{shown_as}:{line}: invalid YAML: {e.problem or e}") from None
    except yaml.YAMLError as e:  # anything else the parser refuses
        raise RecipeError(f"{shown_as}:1: invalid YAML: {e}") from None
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
            line = key_node.start_mark.line + 1
            if not (isinstance(key_node, yaml.ScalarNode) and key_node.tag == "tag:yaml.org,2002:str"):
                shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else "a collection"
                raise RecipeError(f"{shown_as}:{line}: {format_path(path)}: keys are names, not {shown!r}")
            key = key_node.value
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
