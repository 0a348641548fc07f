"""The content-addressed store: one read-only directory per stage key.

    <store>/entries/<k[:2]>/<key>/{meta.json, log.txt, out/}
    <store>/scratch/<key>.<host>.<pid>.<rand>/   work in progress: out/ (published), tmp/ (never)
    <store>/locks/<key>.lock                     one builder per key (see lock.py)
    <store>/quarantine/<key>/                    entries that failed `verify`

Publishing renames a finished scratch directory into `entries/` (same
filesystem, atomic): a killed build leaves only scratch, never an entry.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.engine.errors import KilnError
from pipeline.engine.hashing import hash_file_bytes
from pipeline.engine.lock import FileLock

# What a published entry holds: the stage's output, the runner's log, and meta.json (added at publish).
ENTRY_FILES = frozenset({"out", "log.txt"})


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _set_read_only(root: Path) -> None:
    """Files r--r--r-- (x kept for executables); directories r-xr-xr-x. The top is left to the caller."""
    for dirpath, dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            mode = os.lstat(p).st_mode
            if stat.S_ISREG(mode):
                os.chmod(p, 0o555 if mode & stat.S_IXUSR else 0o444)
        for name in dirs:
            os.chmod(os.path.join(dirpath, name), 0o555)


def make_writable(root: Path) -> None:
    for dirpath, _dirs, _files in os.walk(root):
        os.chmod(dirpath, 0o755)


def remove_tree(root: Path) -> None:
    if root.exists():
        make_writable(root)
        shutil.rmtree(root)


def file_manifest(out: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {size, blake3}} of every file under `out`."""
    return {
        p.relative_to(out).as_posix(): {"size": p.stat().st_size, "blake3": hash_file_bytes(p)}
        for p in sorted(out.rglob("*")) if p.is_file() and not p.is_symlink()
    }


class Store:
    def __init__(self, root: Path):
        self.root = root

    def entry(self, key: str) -> Path:
        return self.root / "entries" / key[:2] / key

    def out(self, key: str) -> Path:
        return self.entry(key) / "out"

    def has(self, key: str) -> bool:
        return (self.entry(key) / "meta.json").is_file()

    def meta(self, key: str) -> dict[str, Any]:
        return json.loads((self.entry(key) / "meta.json").read_text())

    def lock(self, key: str) -> FileLock:
        return FileLock(self.root / "locks" / f"{key}.lock")

    def new_scratch(self, key: str) -> Path:
        scratch = self.root / "scratch" / f"{key}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        (scratch / "out").mkdir(parents=True)
        (scratch / "tmp").mkdir()
        return scratch

    def publish(self, scratch: Path, key: str, meta: dict[str, Any]) -> bool:
        """Seal `scratch` (manifest, meta, fsync, read-only) and rename it into place.

        Returns False when an entry for `key` appeared meanwhile (the scratch is discarded).
        The stage's `tmp/` is dropped; anything else beside `out/` and the log is refused: it
        would be published outside the manifest, unseen by `verify` and the workspace.
        """
        remove_tree(scratch / "tmp")
        stray = sorted(p.name for p in scratch.iterdir() if p.name not in ENTRY_FILES)
        if stray:
            raise KilnError(f"{key[:16]}…: the stage wrote {', '.join(stray)} beside its output dir; "
                            f"outputs go to ctx.out, scratch files to ctx.tmp (nothing was published)")
        meta = {**meta, "key": key, "files": file_manifest(scratch / "out")}
        (scratch / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        _fsync_tree(scratch)
        _set_read_only(scratch)
        final = self.entry(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(scratch, final)
        except OSError:
            if self.has(key):
                remove_tree(scratch)
                return False
            raise
        os.chmod(final, 0o555)
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def touch(self, key: str) -> None:
        """Record a use (gc keeps recently used entries)."""
        try:
            os.utime(self.entry(key))
        except OSError:
            pass  # read-only shared store: age falls back to build time

    def last_used(self, key: str) -> float:
        return self.entry(key).stat().st_mtime

    def keys(self) -> Iterator[str]:
        base = self.root / "entries"
        if base.is_dir():
            for prefix in sorted(base.iterdir()):
                for e in sorted(prefix.iterdir()):
                    if (e / "meta.json").is_file():
                        yield e.name

    def size(self, key: str) -> int:
        return sum(f.stat().st_size for f in self.entry(key).rglob("*") if f.is_file())

    def remove(self, key: str) -> None:
        remove_tree(self.entry(key))

    def quarantine(self, key: str) -> Path:
        dest = self.root / "quarantine" / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        make_writable(self.entry(key))
        if dest.exists():
            remove_tree(dest)
        os.rename(self.entry(key), dest)
        return dest

    def stale_scratch(self, min_age: float = 3600.0) -> list[Path]:
        """Scratch dirs of builds that are no longer running (no live lock) and not recent."""
        base = self.root / "scratch"
        if not base.is_dir():
            return []
        now = time.time()
        out = []
        for d in base.iterdir():
            key = d.name.split(".", 1)[0]
            lock = self.lock(key)
            if lock.path.exists() and not lock.is_stale():
                continue
            if now - d.stat().st_mtime >= min_age:
                out.append(d)
        return out
