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
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.engine.errors import KilnError
from pipeline.engine.hashing import hash_file_bytes
from pipeline.engine.lock import HOST, FileLock

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


def stat_signature(path: Path) -> list[int]:
    """What changes when a file's bytes do, without reading them: size, mtime_ns, inode. (Not ctime:
    linking the file into a workspace and making it read-only change that on a good entry.)"""
    st = path.lstat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def file_manifest(out: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {size, blake3}} of every file under `out`."""
    return {
        p.relative_to(out).as_posix(): {"size": p.stat().st_size, "blake3": hash_file_bytes(p)}
        for p in sorted(out.rglob("*")) if p.is_file() and not p.is_symlink()
    }


def differs_from_manifest(out: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Files of an entry's `out/` (top-level names in `skip` left out) whose bytes are not what
    its meta.json recorded at publish: re-read and hashed, for what leaves the store (bundles)."""
    recorded = json.loads((out.parent / "meta.json").read_text())["files"]
    top = {rel.split("/", 1)[0] for rel in recorded}
    present = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and not p.is_symlink()}
    wanted = {rel for rel in recorded if rel.split("/", 1)[0] not in skip}
    extra = {rel for rel in present - set(recorded) if rel.split("/", 1)[0] in top - set(skip)}
    bad = [rel for rel in sorted(wanted) if rel not in present or hash_file_bytes(out / rel) != recorded[rel]["blake3"]]
    return bad + sorted(extra)


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
        scratch = self.root / "scratch" / f"{key}.{HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
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
        out = scratch / "out"
        files = file_manifest(out)
        meta = {**meta, "key": key, "files": files, "stat": {rel: stat_signature(out / rel) for rel in files}}
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

    def tampered(self, key: str) -> list[str]:
        """Files of the entry whose size, mtime or inode moved since publish (edited through a
        workspace hard link, truncated, replaced); cheap: one lstat a file, no reading."""
        recorded = self.meta(key).get("stat")
        if recorded is None:  # published before signatures were recorded: `doit verify` rehashes it
            return []
        out = self.out(key)
        changed = []
        for rel, signature in recorded.items():
            try:
                if stat_signature(out / rel) != signature:
                    changed.append(rel)
            except OSError:
                changed.append(rel)
        return changed

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
