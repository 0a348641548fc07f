"""Content hashes of source files and directories, cached by stat.

A file is hashed once until it changes: the cache is keyed by (device, inode,
size, mtime_ns). Files in a Hugging Face cache are symlinks to blobs named by
their own hash (sha256 for LFS weights, git sha1 for small files): those names
are taken as the hash, so a 16 GB checkpoint costs a readlink, not a read.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3

_BLOB_NAME = re.compile(r"^([0-9a-f]{64}|[0-9a-f]{40})$")
_CHUNK = 1 << 24


def hash_file_bytes(path: Path) -> str:
    """BLAKE3 of a file's bytes (multi-threaded, memory-mapped for big files)."""
    if path.stat().st_size >= _CHUNK:
        h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        h.update_mmap(path)
    else:
        h = blake3.blake3(path.read_bytes())
    return "blake3:" + h.hexdigest()


def hf_blob_hash(path: Path) -> str | None:
    """The hash a HF cache blob is named by, when `path` is a symlink to one."""
    if not path.is_symlink():
        return None
    target = Path(os.readlink(path))
    if target.parent.name == "blobs" and _BLOB_NAME.match(target.name):
        return ("sha256:" if len(target.name) == 64 else "gitsha1:") + target.name
    return None


class StatCache:
    """(dev, ino, size, mtime_ns) → content hash (or another value derived from the bytes, see
    `memo`), persisted as one JSON file.

    Concurrent writers are harmless: each saves atomically, a lost entry is
    only re-hashed later.
    """

    def __init__(self, file: Path):
        self.file = file
        self.dirty = False
        try:
            self.entries: dict[str, Any] = json.loads(file.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def file_hash(self, path: Path) -> str:
        return hf_blob_hash(path) or self.memo(path, "", lambda: hash_file_bytes(path))

    def memo(self, path: Path, kind: str, compute: Callable[[], Any]) -> Any:
        """`compute()` (a JSON value derived from `path`'s bytes), remembered until the file changes."""
        st = path.stat()
        sig = f"{kind}{':' if kind else ''}{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
        cached = self.entries.get(sig)
        if cached is None:
            cached = self.entries[sig] = compute()
            self.dirty = True
        return cached

    def source_hash(self, path: Path) -> str:
        """A file's hash, or a directory's: the hash of its sorted (relative path, file hash) list."""
        if path.is_file():
            return self.file_hash(path)
        if not path.is_dir():
            raise FileNotFoundError(path)
        listing = [
            f"{f.relative_to(path).as_posix()}\0{self.file_hash(f)}"
            for f in sorted(path.rglob("*"))
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)
        ]
        return "blake3:" + blake3.blake3("\n".join(listing).encode()).hexdigest()

    def save(self) -> None:
        if not self.dirty:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.file.parent, prefix=".statcache.")
        with os.fdopen(fd, "w") as f:
            json.dump(self.entries, f)
        os.replace(tmp, self.file)
        self.dirty = False
