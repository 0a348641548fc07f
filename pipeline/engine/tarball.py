"""Deterministic .tar.gz: same files → same bytes, on any machine, any day.

Entries sorted; mtime fixed (SOURCE_DATE_EPOCH / recipe); uid/gid 0 and empty
owner names; modes normalized to 0644/0755; gzip header without name or time.
"""
from __future__ import annotations

import gzip
import os
import tarfile
from pathlib import Path


def _normalize(info: tarfile.TarInfo, mtime: int) -> tarfile.TarInfo:
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    executable = info.isdir() or bool(info.mode & 0o100)
    info.mode = 0o755 if executable else 0o644
    return info


def write_tarball(src: Path, dest: Path, arcroot: str, mtime: int, compress_level: int = 6) -> None:
    paths = [src] + sorted(src.rglob("*"), key=lambda p: p.relative_to(src).as_posix())
    with open(dest, "wb") as raw, \
            gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=compress_level, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for p in paths:
            rel = p.relative_to(src).as_posix()
            arcname = arcroot if rel == "." else f"{arcroot}/{rel}"
            info = _normalize(tar.gettarinfo(os.fspath(p), arcname), mtime)
            if info.isreg():
                with open(p, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
