"""Tool fingerprints: versions of what a stage runs, part of its key.

Upgrading a tool rebuilds exactly the stages that list it. Fingerprints must
be cheap (they are computed on every `doit` run): package versions come from
installed metadata, never from importing the package.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import cache
from importlib import metadata
from pathlib import Path

from pipeline.engine.errors import ToolMissing

# Python distributions a stage may list by their PyPI name.
_INSTALL_HINT = "run `bash setup.sh` (installs Kiln's Python dependencies into .venv)"


# Executables: `exe:NAME` fingerprints by the first line of `NAME --version`;
# `deb:PKG` by the installed Debian package version.
APT_HINT = {
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu", "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
    "qemu-aarch64-static": "qemu-user-static", "gcc": "gcc", "g++": "g++", "cmake": "cmake",
    "bible": "bible-kjv", "ccache": "ccache", "make": "make", "dot": "graphviz",
}


def require_exe(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pkg = APT_HINT.get(name, name)
        raise ToolMissing(f"`{name}` is not installed: run `sudo apt-get install {pkg}` (or `bash setup.sh`, which installs it)")
    return path


PROBES_KEPT = 256  # remembered tool answers (.probes.json); the oldest go first


def _probes() -> Path:
    from pipeline.engine.settings import Settings

    return Settings.from_env().artifacts / ".probes.json"


def _stat_signature(path: Path) -> str:
    st = path.stat()
    return f"{path}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


@cache
def _import_path_signature() -> str:
    """The directories Python finds distributions in, as they are now: installing, upgrading or
    removing a package adds or removes a `*.dist-info` entry there, which moves the mtime."""
    return "|".join(_stat_signature(Path(p)) for p in sys.path
                    if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p))


@cache
def _known(file: Path) -> dict[str, str]:
    """The remembered answers, read once per process (every fingerprint of a plan asks)."""
    try:
        known = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _remembered(sig: str, probe: Callable[[], str]) -> str:
    """`probe()`, remembered on disk under `sig` (what the answer depends on, as stat signatures): a
    no-op `doit` must not spawn `gcc --version` and friends, or scan every installed distribution's
    metadata, each time."""
    file = _probes()
    known = _known(file)
    if sig not in known:
        known[sig] = probe()
        for stale in list(known)[:-PROBES_KEPT]:  # answers for tools and installs long gone
            del known[stale]
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".probes.")
        with os.fdopen(fd, "w") as f:
            json.dump(known, f)
        os.replace(tmp, file)
    return known[sig]


def _exe_version(name: str) -> str:
    path = Path(require_exe(name)).resolve()

    def probe() -> str:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        first = (out.stdout or out.stderr).strip().splitlines()
        return first[0] if first else "unknown"

    return _remembered(_stat_signature(path), probe)


def _deb_version(pkg: str) -> str:
    def probe() -> str:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg], capture_output=True, text=True)
        if out.returncode != 0 or not out.stdout.strip():
            raise ToolMissing(f"Debian package {pkg!r} is not installed: run `sudo apt-get install {pkg}` "
                              f"(or `bash setup.sh`)")
        return out.stdout.strip()

    listed = sorted(Path("/var/lib/dpkg/info").glob(f"{pkg}.list")) + sorted(Path("/var/lib/dpkg/info").glob(f"{pkg}:*.list"))
    return _remembered(_stat_signature(listed[0]), probe) if listed else probe()


@cache
def fingerprint(tool: str) -> str:
    kind, _, name = tool.partition(":")
    if kind == "exe":
        return _exe_version(name)
    if kind == "deb":
        return _deb_version(name)
    if tool == "python":
        return "{}.{}".format(*sys.version_info[:2])
    if tool == "zlib":  # gzip output bytes depend on it
        import zlib

        return zlib.ZLIB_RUNTIME_VERSION

    def probe() -> str:
        try:
            return metadata.version(tool)
        except metadata.PackageNotFoundError:
            raise ToolMissing(f"Python package {tool!r} is not installed: {_INSTALL_HINT}") from None

    return _remembered(f"python-package:{tool}:{_import_path_signature()}", probe)


def fingerprints(tools: tuple[str, ...]) -> dict[str, str]:
    return {t: fingerprint(t) for t in tools}
