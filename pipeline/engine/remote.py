"""The store's remote tier: action records and outputs shared through an S3-compatible bucket.

    <prefix>/blobs/<h[:2]>/<h>          a file's bytes, named by their BLAKE3 (shared by every output,
                                        log and info file that holds them); immutable
    <prefix>/outputs/<d[:2]>/<d>.json   an output's manifest {digest, files: {path: {size, blake3, exec}}}
    <prefix>/actions/<k[:2]>/<k>.json   an action record: the local record, plus the blobs of that
                                        run's log and info/ files; written once

Push (after a local publish): every blob the record needs, each checked by a HEAD of its size
once written (the server checks every part's SHA-256 as it arrives); then the manifest; then
the record, last, with a create-if-absent write. A reader that finds a record therefore finds
its manifest and blobs; a push killed anywhere leaves blobs or a manifest no record names (the
next push skips what is there; `gc --remote` collects what stays unnamed). Two builders pushing
one action key: the first record stays, the second push is told so.

Pull (a local miss): the record, the manifest (its digest must be the record's output: it names
every file's hash), then every file streamed into a scratch dir and hashed on the way; a file
that is missing or whose bytes differ makes the entry a miss (the stage builds and pushes
again), never a published output. The pulled scratch is published like a build's.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import blake3

from pipeline.engine.errors import KilnError
from pipeline.engine.keys import canonical_json, output_digest
from pipeline.engine.objstore import Bucket, RemoteUnavailable
from pipeline.engine.store import Store, file_entry, output_files, remove_tree

HEX64 = re.compile(r"[0-9a-f]{64}")
BLAKE3 = re.compile(r"blake3:[0-9a-f]{64}")
MAX_DOC = 64 << 20  # a record or manifest larger than this is not one Kiln wrote


class RemoteCorrupt(KilnError):
    """What the bucket holds for an entry is not what its record and manifest say."""


@dataclass
class Transfer:
    """What one push or pull moved."""

    files: int = 0
    bytes: int = 0
    present: int = 0       # blobs already in the bucket (push) or outputs already here (pull)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.files} files, {self.bytes / 1e6:.1f} MB" + (f", {self.present} already there" if self.present else "")


def blob_key(blake: str) -> str:
    h = blake.removeprefix("blake3:")
    return f"blobs/{h[:2]}/{h}"


def manifest_key(digest: str) -> str:
    return f"outputs/{digest[:2]}/{digest}.json"


def record_key(key: str) -> str:
    return f"actions/{key[:2]}/{key}.json"


class RemoteTier:
    def __init__(self, bucket: Bucket):
        self.bucket = bucket
        self.url = bucket.url
        self.down: str | None = None  # why it was found unreachable in this process (then skipped)

    # --- push ---
    def push(self, store: Store, key: str) -> Transfer:
        """Upload the local entry of `key` (record, output, log and info), record last."""
        record = store.record(key)
        if record is None:
            raise KilnError(f"{key[:16]}…: no local action record to push")
        digest = record["output"]
        manifest = store.manifest(digest)
        action = store.action(key)
        extras = {rel: file_entry(action / rel)
                  for rel in ["log.txt"] + [p.relative_to(action).as_posix() for p in output_files(action / "info")]
                  if (action / rel).is_file()}
        moved = Transfer()
        sources = {f["blake3"]: store.out(digest) / rel for rel, f in manifest["files"].items()}
        sources.update({f["blake3"]: action / rel for rel, f in extras.items()})
        sizes = {f["blake3"]: f["size"] for f in [*manifest["files"].values(), *extras.values()]}
        for blake, path in sorted(sources.items()):
            self._push_blob(blake, path, sizes[blake], moved)
        self.bucket.create(manifest_key(digest), canonical_json({"digest": digest, "files": manifest["files"]}).encode())
        doc = {**record, "run_files": extras}
        if not self.bucket.create(record_key(key), canonical_json(doc).encode()):
            theirs = self._document(record_key(key))
            if theirs and theirs.get("output") != digest:
                moved.notes.append(f"the bucket's record of this key names output {str(theirs.get('output'))[:16]}…, "
                                   f"not this build's {digest[:16]}… (a non-deterministic stage?); the bucket's stays")
            else:
                moved.notes.append("another builder pushed this key first (same output)")
        return moved

    def _push_blob(self, blake: str, path: Path, size: int, moved: Transfer) -> None:
        name = blob_key(blake)
        if self.bucket.size(name) == size:
            moved.present += 1
            return
        failure: RemoteUnavailable | None = None
        for _ in (1, 2):
            try:
                self.bucket.upload(name, path)
            except RemoteUnavailable as e:  # the upload may still have landed (a lost reply): look
                failure = e
            held = self.bucket.size(name)
            if held == size:
                moved.files += 1
                moved.bytes += size
                return
            if held is not None:
                self.bucket.delete(name)
        if failure is not None:
            raise failure
        raise KilnError(f"{self.url}/{name}: the bucket holds a different size than the {size} bytes uploaded, twice")

    # --- pull ---
    def pull(self, store: Store, key: str) -> tuple[str, Transfer] | None:
        """Publish the bucket's entry of `key` in `store`; None when the bucket has none. A corrupt
        entry raises RemoteCorrupt after removing what it had downloaded."""
        record = self._document(record_key(key))
        if record is None:
            return None
        digest = _check_record(record, key, self.url)
        moved = Transfer()
        scratch = store.new_scratch(key)
        try:
            self._download_output(store, digest, scratch, moved, f"record {key[:16]}…")
            for rel, f in _check_files(record.get("run_files", {}), f"record {key[:16]}…", self.url).items():
                if rel != "log.txt" and not rel.startswith("info/"):
                    raise RemoteCorrupt(f"{self.url}: record {key[:16]}… lists {rel[:80]!r} beside the run's log and info/")
                self._pull_blob(f, scratch / rel, moved)
            local = {k: v for k, v in record.items() if k not in ("key", "output", "run_files")}
            got, _ = store.publish(scratch, key, {**local, "pulled_from": self.url}, expected=digest)
        except BaseException:
            remove_tree(scratch)
            raise
        return got, moved

    def pull_output(self, store: Store, digest: str) -> Transfer:
        """Publish output `digest` (no action record) in `store` from the bucket: a stage's input on a
        Ray node that does not mount the driver's store."""
        moved = Transfer()
        if store.has_output(digest):
            moved.present += 1
            return moved
        scratch = store.new_scratch(digest)
        try:
            self._download_output(store, digest, scratch, moved, f"input {digest[:16]}…")
            store.publish_output(scratch, expected=digest)
        finally:
            remove_tree(scratch)
        return moved

    def _download_output(self, store: Store, digest: str, scratch: Path, moved: Transfer, who: str) -> None:
        if store.has_output(digest):
            moved.present += 1
            return
        doc = self._document(manifest_key(digest))
        if doc is None:
            raise RemoteCorrupt(f"{self.url}: {who} names output {digest[:16]}…, whose manifest is missing")
        for rel, f in _check_manifest(doc, digest, self.url).items():
            self._pull_blob(f, scratch / "out" / rel, moved)

    def _pull_blob(self, f: dict[str, Any], dest: Path, moved: Transfer) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        h, n = blake3.blake3(), 0
        try:
            with open(dest, "xb") as out:
                for chunk in self.bucket.stream(blob_key(f["blake3"])):
                    n += len(chunk)
                    if n > f["size"]:
                        break
                    h.update(chunk)
                    out.write(chunk)
        except FileNotFoundError:
            raise RemoteCorrupt(f"{self.url}: blob {f['blake3'][7:23]}… of {dest.name} is missing") from None
        if n != f["size"] or "blake3:" + h.hexdigest() != f["blake3"]:
            raise RemoteCorrupt(f"{self.url}: blob {f['blake3'][7:23]}… of {dest.name} does not hold the bytes its "
                                f"name says ({n} bytes read, {f['size']} expected)")
        if f["exec"]:
            dest.chmod(0o755)
        moved.files += 1
        moved.bytes += n

    def _document(self, name: str) -> dict[str, Any] | None:
        size = self.bucket.size(name)
        if size is None:
            return None
        if size > MAX_DOC:
            raise RemoteCorrupt(f"{self.url}/{name}: {size} bytes, more than any record or manifest Kiln writes")
        raw = self.bucket.read(name)
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
        except ValueError:
            raise RemoteCorrupt(f"{self.url}/{name}: not JSON") from None
        if not isinstance(doc, dict):
            raise RemoteCorrupt(f"{self.url}/{name}: not a JSON object")
        return doc

    # --- whole-bucket passes (verify --remote, gc --remote) ---
    def verify(self, say: Callable[[str], None]) -> list[str]:
        """Re-read and hash every blob a record names (each once); a record whose manifest or any
        blob is missing or wrong is deleted (record first, so no reader meets it half gone), with
        the bad blobs. Returns the keys dropped."""
        records, _ = self._records()
        blobs: dict[str, dict[str, Any]] = {}
        uses: dict[str, set[str]] = {}  # blob -> keys whose entry needs it
        dropped: set[str] = set()
        for key, (doc, _) in sorted(records.items()):
            try:
                digest = _check_record(doc, key, self.url)
                manifest = self._document(manifest_key(digest))
                if manifest is None:
                    raise RemoteCorrupt(f"{self.url}: record {key[:16]}… names output {digest[:16]}…, whose manifest is missing")
                files = [*_check_manifest(manifest, digest, self.url).values(),
                         *_check_files(doc.get("run_files", {}), f"record {key[:16]}…", self.url).values()]
            except RemoteCorrupt as e:
                say(f"verify --remote: {e}")
                dropped.add(key)
                continue
            for f in files:
                blobs[f["blake3"]] = f
                uses.setdefault(f["blake3"], set()).add(key)
        total = sum(f["size"] for f in blobs.values())
        from pipeline.engine.progress import bar

        with bar("verify --remote", "B", total, scale=True) as read:
            for blake, f in sorted(blobs.items()):
                if not self.blob_intact(f, read.update):
                    say(f"verify --remote: blob {blake[7:23]}… is missing or does not hold its bytes "
                        f"(needed by {len(uses[blake])} record(s)); deleting it")
                    self.bucket.delete(blob_key(blake))
                    dropped |= uses[blake]
        for key in sorted(dropped):
            self.bucket.delete(record_key(key))
        say(f"verify --remote: {len(records)} records, {len(blobs)} blobs ({total / 1e6:.1f} MB) re-read from "
            f"{self.url}; {len(dropped)} record(s) deleted")
        return sorted(dropped)

    def gc(self, keep: set[str], max_age_s: float, grace_s: float, dry_run: bool, say: Callable[[str], None]) -> int:
        """Delete records neither in `keep` nor pushed within `max_age_s`; then manifests and blobs
        no remaining record names, unless younger than `grace_s` (a push in flight writes its blobs
        and manifest before its record). Returns the objects deleted (or that would be)."""
        now = datetime.now(UTC)
        records, listed = self._records()
        kept = {k: doc for k, (doc, when) in records.items() if k in keep or (now - when).total_seconds() < max_age_s}
        doomed = [record_key(k) for k in sorted(set(records) - set(kept))]
        outputs, blobs = set(), set()
        for doc in kept.values():
            outputs.add(str(doc.get("output")))
            blobs.update(f.get("blake3") for f in doc.get("run_files", {}).values() if isinstance(f, dict))
        for digest in outputs:
            manifest = self._document(manifest_key(digest)) if HEX64.fullmatch(digest) else None
            blobs.update(f.get("blake3") for f in (manifest or {}).get("files", {}).values() if isinstance(f, dict))
        for item in listed:
            young = (now - item.modified).total_seconds() < grace_s
            name = Path(item.key).name
            if item.key.startswith("outputs/") and name.removesuffix(".json") not in outputs and not young:
                doomed.append(item.key)
            elif item.key.startswith("blobs/") and f"blake3:{name}" not in blobs and not young:
                doomed.append(item.key)
        verb = "would delete" if dry_run else "deleted"
        for name in doomed:  # records first: nothing a kept record names is ever deleted
            if not dry_run:
                self.bucket.delete(name)
        gone = sum(1 for d in doomed if d.startswith("actions/"))
        say(f"gc --remote: {verb} {gone} record(s), {len(doomed) - gone} unreferenced manifest(s)/blob(s) in "
            f"{self.url}; kept {len(kept)} record(s)")
        return len(doomed)

    def _records(self) -> tuple[dict[str, tuple[dict[str, Any], datetime]], list[Any]]:
        """({key: (record, pushed at)} of every readable record, the whole listing)."""
        listed = list(self.bucket.listing())
        out = {}
        for item in listed:
            key = Path(item.key).name.removesuffix(".json")
            if item.key.startswith("actions/") and HEX64.fullmatch(key):
                try:
                    doc = self._document(item.key)
                except RemoteCorrupt:
                    doc = {}
                if doc is not None:
                    out[key] = (doc, item.modified)
        return out, listed

    def blob_intact(self, f: dict[str, Any], on_progress: Callable[[int], Any] | None = None) -> bool:
        """Re-read a blob and hash it."""
        h, n = blake3.blake3(), 0
        try:
            for chunk in self.bucket.stream(blob_key(f["blake3"])):
                h.update(chunk)
                n += len(chunk)
                if on_progress:
                    on_progress(len(chunk))
        except FileNotFoundError:
            return False
        return n == f["size"] and "blake3:" + h.hexdigest() == f["blake3"]


def _check_record(record: dict[str, Any], key: str, url: str) -> str:
    digest = record.get("output")
    if record.get("key") != key or not isinstance(digest, str) or not HEX64.fullmatch(digest):
        raise RemoteCorrupt(f"{url}: the record stored under {key[:16]}… is not that key's record")
    return digest


def _check_files(files: Any, where: str, url: str) -> dict[str, dict[str, Any]]:
    """Validate a {relative path: {size, blake3, exec}} map from the bucket: paths stay inside the
    directory they are written to, hashes and sizes are well-formed."""
    if not isinstance(files, dict):
        raise RemoteCorrupt(f"{url}: {where}: its file list is not a map")
    for rel, f in files.items():
        parts = rel.split("/") if isinstance(rel, str) else [""]
        if (not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in rel or "\0" in rel
                or not isinstance(f, dict) or not isinstance(f.get("size"), int) or f["size"] < 0
                or not isinstance(f.get("blake3"), str) or not BLAKE3.fullmatch(f["blake3"])
                or not isinstance(f.get("exec"), bool)):
            raise RemoteCorrupt(f"{url}: {where}: entry {str(rel)[:80]!r} is not a file of a Kiln output")
    return files


def _check_manifest(doc: dict[str, Any], digest: str, url: str) -> dict[str, dict[str, Any]]:
    files = _check_files(doc.get("files"), f"manifest {digest[:16]}…", url)
    if output_digest(files) != digest:
        raise RemoteCorrupt(f"{url}: manifest {digest[:16]}… does not hash to its name")
    return files
