"""Lay out a fake QAIRT SDK tree whose tools are this folder's test doubles.

The layout is the real SDK's where Kiln looks: bin/x86_64-linux-clang/<tool>, lib/x86_64-linux-clang/<lib>,
sdk.yaml at the root. Tools are symlinks to the doubles (Python resolves the link, so they find _double.py);
libraries are empty files: the doubles only check that they exist.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

DOUBLES = Path(__file__).resolve().parent
HOST = "x86_64-linux-clang"
TOOLS = ("qairt-converter", "qairt-quantizer", "qnn-context-binary-generator")
LIBS = ("libQnnHtp.so", "libQnnHtpNetRunExtensions.so", "libQnnModelDlc.so", "libQnnSystem.so")


def make_fake_sdk(root: Path, *, version: str | None = "2.39.0", build_id: str | None = "250926",
                  omit: Iterable[str] = ()) -> Path:
    """A fake SDK at `root`; `omit` leaves out tools or libraries by name; version=None writes no sdk.yaml."""
    omit = set(omit)
    bin_dir, lib_dir = root / "bin" / HOST, root / "lib" / HOST
    bin_dir.mkdir(parents=True)
    lib_dir.mkdir(parents=True)
    for tool in TOOLS:
        if tool not in omit:
            (bin_dir / tool).symlink_to(DOUBLES / tool)
    for lib in LIBS:
        if lib not in omit:
            (lib_dir / lib).write_bytes(b"")
    if version is not None:
        lines = [f"version: {version}"] + ([f"build_id: {build_id}"] if build_id else [])
        (root / "sdk.yaml").write_text("\n".join(lines) + "\n")
    return root
