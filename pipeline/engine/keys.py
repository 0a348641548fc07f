"""Stage keys: the content address of a stage's output.

key = BLAKE3-256 over the canonical JSON of (stage, version, params, input
keys, source hashes, tool fingerprints). Inputs enter by key, never by their
bytes, so keys chain like a Merkle DAG and no intermediate is re-read to
decide anything. Full 256-bit hex; never truncated.
"""
from __future__ import annotations

import json
from typing import Any

import blake3


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def key_material(
    stage: str, version: int, params: dict[str, Any], inputs: dict[str, str],
    sources: dict[str, str], tools: dict[str, str],
) -> dict[str, Any]:
    return {"stage": stage, "version": version, "params": params, "inputs": inputs,
            "sources": sources, "tools": tools}


def compute_key(material: dict[str, Any]) -> str:
    return blake3.blake3(canonical_json(material).encode()).hexdigest()


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


def _short(value: Any) -> str:
    text = canonical_json(value)
    return text if len(text) <= 48 else text[:20] + "…" + text[-20:]
