"""Just enough ELF reading to check a built binary: machine and static linking."""
from __future__ import annotations

import struct
from pathlib import Path

MACHINES = {62: "x86_64", 183: "aarch64", 40: "arm"}
PT_INTERP = 3


def describe(path: Path) -> dict[str, object]:
    """{machine, static, size} of a 64-bit little-endian ELF executable."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path}: not a 64-bit little-endian ELF file")
    machine = struct.unpack_from("<H", data, 18)[0]
    phoff = struct.unpack_from("<Q", data, 32)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    return {"machine": MACHINES.get(machine, str(machine)), "static": PT_INTERP not in types,
            "size": len(data)}
