"""Two addresses: the action key (what determines a run) and the output digest (what it made).

action key = BLAKE3-256 over the canonical JSON of (stage, version, params, source hashes, tool
fingerprints, the stage's code, and the *output digests* of its inputs). Inputs enter by what
their outputs hold, not by how they were made, so a stage rebuilt to the same bytes re-keys
nothing downstream (early cutoff). Output digest = BLAKE3-256 over the canonical JSON of the
output's manifest (every file's path, size, content hash, executable bit): computed once at
publish from hashes the store records anyway, never by re-reading an input. Full 256-bit hex.
"""
from __future__ import annotations

import json
from typing import Any

import blake3


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def compute_key(material: dict[str, Any]) -> str:
    return blake3.blake3(canonical_json(material).encode()).hexdigest()


def output_digest(files: dict[str, dict[str, Any]]) -> str:
    """The digest of an output from its manifest ({path: {size, blake3, exec}})."""
    return blake3.blake3(canonical_json(files).encode()).hexdigest()


def diff(old: Any, new: Any, path: str = "") -> list[str]:
    """Human-readable differences between two key materials ('params.dtype: a → b')."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            sub = f"{path}.{k}" if path else str(k)
            if k not in old:
                out.append(f"{sub}: added ({_short(new[k])})")
            elif k not in new:
                out.append(f"{sub}: removed (was {_short(old[k])})")
            else:
                out.extend(diff(old[k], new[k], sub))
        return out
    return [] if old == new else [f"{path}: {_short(old)} → {_short(new)}"]


# What a changed key field means, for one-line summaries ("rebuilt (source changed)").
_CAUSES = {"code": "source changed", "params": "params changed", "inputs": "input changed",
           "sources": "source files changed", "tools": "tool changed", "version": "version bumped"}


def causes(changes: list[str]) -> str:
    """'source changed, tool changed' from diff lines ('code.pipeline.x: … → …')."""
    found = dict.fromkeys(_CAUSES.get(c.split(".", 1)[0].split(":", 1)[0], "key changed") for c in changes)
    return ", ".join(found) or "key changed"


def _short(value: Any) -> str:
    text = canonical_json(value)
    return text if len(text) <= 48 else text[:20] + "…" + text[-20:]
