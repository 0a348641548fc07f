"""The content-addressed store: outputs by what they hold, action records by what made them.

    <store>/outputs/<d[:2]>/<digest>/{manifest.json, out/}   one per output digest, read-only
    <store>/actions/<k[:2]>/<key>/{action.json, log.txt, info/}
                                     one per action key: names its output digest, plus that run's
                                     log and measurements (info/: timings, never part of the output)
    <store>/scratch/<key>.<host>.<pid>.<rand>/   work in progress: out/, info/, log.txt; tmp/ (dropped)
    <store>/locks/<key>.lock                     one builder per action key (see lock.py)
    <store>/quarantine/<digest>/                 outputs whose files changed after publish

Publishing renames the finished output into `outputs/` (same filesystem, atomic; when that
digest is already there, the new copy is dropped: two action keys with the same output share one
copy), then renames the action record into `actions/`: the record is written last, so a reader
never finds a record whose output is missing. A killed build leaves only scratch.
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
from pipeline.engine.keys import output_digest
from pipeline.engine.lock import HOST, FileLock

# What a stage's scratch may hold when it is published: its output, its measurements, the log.
SCRATCH_FILES = frozenset({"out", "info", "log.txt"})
# The store layout before output digests (one entries/<key>/ per stage key): never read.
LEGACY_ENTRIES = "entries"


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


def changed_files(root: Path, signatures: dict[str, list[int]]) -> list[str]:
    """The files under `root` (relative paths) whose `stat_signature` is not the one given, or that
    are gone. On plain strings: at thousands of files (a llama.cpp source tree) pathlib's joins cost
    more than the lstat calls, and a no-op `doit` makes two passes of them."""
    base = os.fspath(root)
    changed = []
    for rel, signature in signatures.items():
        try:
            st = os.lstat(os.path.join(base, rel))
        except OSError:
            changed.append(rel)
            continue
        if [st.st_size, st.st_mtime_ns, st.st_ino] != signature:
            changed.append(rel)
    return changed


def output_files(root: Path) -> list[Path]:
    """Every regular file under `root` (symlinks left out), sorted: what a manifest covers."""
    return [p for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()]


def file_entry(path: Path) -> dict[str, Any]:
    """{size, blake3, exec} of one file, as a manifest lists it."""
    st = path.stat()
    return {"size": st.st_size, "blake3": hash_file_bytes(path), "exec": bool(st.st_mode & stat.S_IXUSR)}


def file_manifest(out: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {size, blake3, exec}} of every file under `out`: what its digest covers."""
    return {p.relative_to(out).as_posix(): file_entry(p) for p in output_files(out)}


def differs_from_manifest(out: Path) -> list[str]:
    """Files of an output's `out/` whose bytes are not what its manifest recorded at publish (or
    that were added since): re-read and hashed, for what leaves the store (bundles)."""
    recorded = json.loads((out.parent / "manifest.json").read_text())["files"]
    present = {p.relative_to(out).as_posix() for p in output_files(out)}
    bad = [rel for rel in sorted(recorded)
           if rel not in present or hash_file_bytes(out / rel) != recorded[rel]["blake3"]]
    return bad + sorted(present - set(recorded))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _seal(staging: Path, final: Path) -> bool:
    """fsync, make read-only and rename `staging` to `final`; False (staging removed) when
    `final` exists already (another builder published the same thing first)."""
    _fsync_tree(staging)
    _set_read_only(staging)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(staging, final)
    except OSError:
        if final.is_dir():
            remove_tree(staging)
            return False
        raise
    os.chmod(final, 0o555)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


class Store:
    def __init__(self, root: Path):
        self.root = root

    # --- outputs, by digest ---
    def output(self, digest: str) -> Path:
        return self.root / "outputs" / digest[:2] / digest

    def out(self, digest: str) -> Path:
        return self.output(digest) / "out"

    def has_output(self, digest: str) -> bool:
        return (self.output(digest) / "manifest.json").is_file()

    def manifest(self, digest: str) -> dict[str, Any]:
        return json.loads((self.output(digest) / "manifest.json").read_text())

    # --- action records, by action key ---
    def action(self, key: str) -> Path:
        return self.root / "actions" / key[:2] / key

    def record(self, key: str) -> dict[str, Any] | None:
        """The action record of `key`, or None when that action never completed here."""
        return _read_json(self.action(key) / "action.json")

    def output_of(self, key: str) -> str | None:
        """The output digest `key` produced, when its record and that output are both here."""
        rec = self.record(key)
        return rec["output"] if rec and self.has_output(rec["output"]) else None

    def lock(self, key: str) -> FileLock:
        return FileLock(self.root / "locks" / f"{key}.lock")

    def new_scratch(self, key: str) -> Path:
        scratch = self.root / "scratch" / f"{key}.{HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        for sub in ("out", "info", "tmp"):
            (scratch / sub).mkdir(parents=True)
        return scratch

    def publish(self, scratch: Path, key: str, record: dict[str, Any], expected: str | None = None) -> tuple[str, bool]:
        """Publish a finished scratch: its `out/` as an output (unless that digest is here already),
        then the action record naming it. Returns (output digest, whether this copy was the one kept).
        `expected`: the digest the output must have (an entry pulled from the remote tier; when that
        output is here already, `out/` is left empty).

        The stage's `tmp/` is dropped; anything else beside `out/`, `info/` and the log is refused:
        it would be published outside the manifest, unseen by `verify` and the workspace.
        """
        remove_tree(scratch / "tmp")
        stray = sorted(p.name for p in scratch.iterdir() if p.name not in SCRATCH_FILES)
        if stray:
            raise KilnError(f"{key[:16]}…: the stage wrote {', '.join(stray)} beside its output dir; "
                            f"outputs go to ctx.out, measurements to ctx.info, scratch files to ctx.tmp "
                            f"(nothing was published)")
        clash = sorted({p.name for p in (scratch / "out").iterdir()} & {p.name for p in (scratch / "info").iterdir()})
        if clash:
            raise KilnError(f"{key[:16]}…: {', '.join(clash)} written to both ctx.out and ctx.info; the workspace "
                            f"shows both side by side (nothing was published)")
        digest, kept = self.publish_output(scratch, expected, key[:16] + "…")
        action = scratch / "action"
        action.mkdir()
        for name in ("info", "log.txt"):
            if (scratch / name).exists():
                os.rename(scratch / name, action / name)
        # written last, after the output it names is in place
        (action / "action.json").write_text(json.dumps({**record, "key": key, "output": digest}, indent=2,
                                                       sort_keys=True))
        if self.action(key).exists() and self.output_of(key) is None:
            # a record whose output was quarantined or removed: this build replaces it (the caller
            # holds the key's lock; the old record is renamed away first, so no reader sees a mix)
            stale = scratch / "stale-action"
            make_writable(self.action(key))
            os.rename(self.action(key), stale)
        _seal(action, self.action(key))
        remove_tree(scratch)
        return digest, kept

    def publish_output(self, scratch: Path, expected: str | None = None, name: str = "") -> tuple[str, bool]:
        """The output half of `publish`: `scratch/out` sealed under its digest (unless that digest is
        here already: then `out/` may be empty when it was `expected`). Returns (digest, kept)."""
        if expected is not None and self.has_output(expected):
            return expected, False
        files = file_manifest(scratch / "out")
        digest = output_digest(files)
        if expected is not None and digest != expected:
            raise KilnError(f"{name or expected[:16]}: the output came out as {digest[:16]}…, not the "
                            f"{expected[:16]}… expected (nothing was published)")
        if self.has_output(digest):
            return digest, False
        staging = scratch / "output"
        staging.mkdir()
        os.rename(scratch / "out", staging / "out")
        manifest = {"digest": digest, "files": files,
                    "stat": {rel: stat_signature(staging / "out" / rel) for rel in files}}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return digest, _seal(staging, self.output(digest))

    def tampered(self, digest: str) -> list[str]:
        """Files of the output whose size, mtime or inode moved since publish (edited through a
        workspace hard link, truncated, replaced); cheap: one lstat a file, no reading."""
        return changed_files(self.out(digest), self.manifest(digest)["stat"])

    def touch(self, key: str, digest: str) -> None:
        """Record a use (gc keeps recently used records and outputs)."""
        for path in (self.action(key), self.output(digest)):
            try:
                os.utime(path)
            except OSError:
                pass  # read-only shared store: age falls back to build time

    @staticmethod
    def last_used(path: Path) -> float:
        return path.stat().st_mtime

    def _listed(self, kind: str, marker: str) -> Iterator[str]:
        base = self.root / kind
        if base.is_dir():
            for prefix in sorted(base.iterdir()):
                for e in sorted(prefix.iterdir()):
                    if (e / marker).is_file():
                        yield e.name

    def outputs(self) -> Iterator[str]:
        return self._listed("outputs", "manifest.json")

    def actions(self) -> Iterator[str]:
        return self._listed("actions", "action.json")

    def remove_output(self, digest: str) -> None:
        remove_tree(self.output(digest))

    def remove_action(self, key: str) -> None:
        remove_tree(self.action(key))

    def forget(self, key: str) -> None:
        """Drop an action record and the output it names (benches and tests: make a stage build again
        from nothing). Other records naming that output become misses."""
        if (rec := self.record(key)) is not None:
            remove_tree(self.output(rec["output"]))
        self.remove_action(key)

    def quarantine(self, digest: str) -> Path:
        """Move an output out of use: records naming it become misses, and the stage builds again."""
        dest = self.root / "quarantine" / digest
        dest.parent.mkdir(parents=True, exist_ok=True)
        make_writable(self.output(digest))
        if dest.exists():
            remove_tree(dest)
        os.rename(self.output(digest), dest)
        return dest

    def resume_dir(self, key: str) -> Path:
        """Where runs of `key` keep what a later run of the same key may resume from (per-layer
        calibration checkpoints): it survives a failed or killed run, never a published one."""
        return self.root / "resume" / key

    def stale_resume(self, max_age_s: float) -> list[Path]:
        """Resume state of keys that have published since, or that no run touched for `max_age_s`."""
        base = self.root / "resume"
        now = time.time()
        out = []
        for d in sorted(base.iterdir()) if base.is_dir() else []:
            lock = self.lock(d.name)
            running = lock.path.exists() and not lock.is_stale()
            if not running and (self.record(d.name) is not None or now - d.stat().st_mtime >= max_age_s):
                out.append(d)
        return out

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
