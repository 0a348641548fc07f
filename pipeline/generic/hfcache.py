"""Offline lookups in the local Hugging Face cache (this machine has no hub access).

The cache layout (huggingface_hub): <cache>/<kind>s--<org>--<name>/{refs/<rev>,
snapshots/<commit>/..., blobs/<sha>}; snapshot files are symlinks to blobs
named by their hash, which hashing.py reuses as content hashes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface")
    return Path(home) / "hub"


def repo_folder(repo_id: str, kind: Literal["model", "dataset"]) -> str:
    return f"{kind}s--{repo_id.replace('/', '--')}"


def snapshot(repo_id: str, revision: str, kind: Literal["model", "dataset"]) -> Path | None:
    """The snapshot directory of `repo_id` at `revision` (branch, tag or commit), or None."""
    repo = hf_cache_dir() / repo_folder(repo_id, kind)
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snap = repo / "snapshots" / commit
    return snap if snap.is_dir() else None
