"""Tool fingerprints: versions of what a stage runs, part of its key.

Upgrading a tool rebuilds exactly the stages that list it. Fingerprints must
be cheap (they are computed on every `doit` run): package versions come from
installed metadata, never from importing the package.
"""
from __future__ import annotations

import sys
from functools import cache
from importlib import metadata

from .errors import ToolMissing

# Python distributions a stage may list by their PyPI name.
_INSTALL_HINT = "run `bash setup.sh` (installs Kiln's Python dependencies into .venv)"


@cache
def fingerprint(tool: str) -> str:
    if tool == "python":
        return "%d.%d" % sys.version_info[:2]
    if tool == "zlib":  # gzip output bytes depend on it
        import zlib

        return zlib.ZLIB_RUNTIME_VERSION
    try:
        return metadata.version(tool)
    except metadata.PackageNotFoundError:
        raise ToolMissing(f"Python package {tool!r} is not installed: {_INSTALL_HINT}") from None


def fingerprints(tools: tuple[str, ...]) -> dict[str, str]:
    return {t: fingerprint(t) for t in tools}
