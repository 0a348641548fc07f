"""Put a store entry's files into the workspace without copying when possible.

Per file, the first method the filesystem allows: reflink (FICLONE: a
copy-on-write clone), hardlink, symlink, copy. The workspace directory is
built beside its destination and swapped in by rename, so it is never seen
half-written.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path

FICLONE = 0x40049409  # _IOW(0x94, 9, int) from linux/fs.h
METHODS = ("reflink", "hardlink", "symlink", "copy")


def _reflink(src: Path, dst: Path) -> None:
    # "xb", never "wb": an existing dst may be a hard link to a store file, and truncating it
    # would empty the store entry itself
    with open(src, "rb") as s, open(dst, "xb") as d:
        try:
            fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
        except OSError:
            d.close()
            dst.unlink()
            raise


def _link_one(method: str, src: Path, dst: Path) -> None:
    if method == "reflink":
        _reflink(src, dst)
    elif method == "hardlink":
        os.link(src, dst)
    elif method == "symlink":
        os.symlink(src, dst)
    else:
        shutil.copy2(src, dst)


def link_or_copy(src: Path, dst: Path, methods: tuple[str, ...] = ("reflink", "hardlink", "copy")) -> str:
    """Put file `src` at `dst` by the first method the filesystem allows; return the method."""
    for method in methods:
        try:
            _link_one(method, src, dst)
            return method
        except OSError:
            if method == methods[-1]:
                raise
    raise ValueError("no method given")


def link_tree(src: Path, dst: Path, methods: tuple[str, ...] = METHODS, skip: tuple[str, ...] = ()) -> str:
    """Mirror `src` into `dst` (created, or merged into when it exists), less the top-level
    entries named in `skip`; return the method used. A file already at a destination is an
    error (FileExistsError), never overwritten: it may be a hard link into the store."""
    dst.mkdir(parents=True, exist_ok=True)
    usable = list(methods)
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        if rel == Path("."):
            dirnames[:] = [d for d in dirnames if d not in skip]
            filenames = [f for f in filenames if f not in skip]
        for d in dirnames:
            (dst / rel / d).mkdir(exist_ok=True)
        for name in filenames:
            s, d = Path(dirpath) / name, dst / rel / name
            if os.path.lexists(d):
                raise FileExistsError(errno.EEXIST, "already there", str(d))
            while True:
                try:
                    _link_one(usable[0], s, d)
                    break
                except OSError:
                    if len(usable) == 1:
                        raise
                    usable.pop(0)  # this filesystem refuses it: stop trying it
    return usable[0]


def replace_dir(new: Path, dest: Path) -> None:
    """Swap `new` into `dest` (rename; the previous content is removed after)."""
    old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    elif dest.exists():
        os.rename(dest, old)
    os.rename(new, dest)
    if old.exists():
        shutil.rmtree(old)


def materialize(srcs: list[Path], dest: Path, extra: dict[str, str] | None = None,
                methods: tuple[str, ...] = METHODS) -> str:
    """Make `dest` mirror the trees `srcs` merged (plus small `extra` files written as text)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.new.{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    method = ""
    for src in srcs:
        method = link_tree(src, tmp, methods)
    for name, text in (extra or {}).items():
        (tmp / name).write_text(text)
    replace_dir(tmp, dest)
    return method
