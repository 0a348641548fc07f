"""What the QAIRT tool doubles share: argv logging, strict argparse, error exits, DLC stand-ins.

The doubles exist only because Qualcomm's QAIRT SDK cannot be installed here (docs/qualcomm.md#qairt-sdk);
they check their arguments the way the real tools would and write small JSON stand-ins, never models.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

STANDIN_MARK = "kiln-test-double"
STANDIN_NOTE = "stand-in written by a Kiln test double (tests/qnn/qairt_doubles); not a real {kind}"


def log_argv(tool: str) -> None:
    """Append this call's full argv (argv[0]: the path it was run by) to $QAIRT_DOUBLE_LOG, as JSON lines."""
    log = os.environ.get("QAIRT_DOUBLE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"tool": tool, "argv": sys.argv, "cwd": os.getcwd()}) + "\n")


def parser(tool: str, description: str) -> argparse.ArgumentParser:
    """argparse as the real Python tools use it: unknown flags exit 2 with a usage error.

    allow_abbrev=False: a double must not accept a misspelt prefix the caller would then rely on.
    """
    return argparse.ArgumentParser(prog=tool, description=description, allow_abbrev=False)


def fail(tool: str, message: str) -> NoReturn:
    print(f"[ERROR] {tool}: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def existing_file(tool: str, flag: str, value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        fail(tool, f"{flag}: file {value} does not exist")
    return path


def sdk_root() -> Path:
    """The fake SDK this double was called from: <root>/bin/x86_64-linux-clang/<tool>.

    sys.argv[0] keeps the path it was invoked by (a symlink in the fake SDK), unlike __file__.
    """
    return Path(os.path.abspath(sys.argv[0])).parents[2]


def write_standin(path: Path, kind: str, tool: str, **fields: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {STANDIN_MARK: STANDIN_NOTE.format(kind=kind), "kind": kind, "tool": tool, **fields}
    path.write_text(json.dumps(body, indent=2) + "\n")


def read_dlc(tool: str, flag: str, value: str) -> dict[str, Any]:
    """A DLC stand-in written by the converter or quantizer double; anything else is not a DLC here."""
    path = existing_file(tool, flag, value)
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        fail(tool, f"{flag}: {value} is not a DLC (not a test-double stand-in)")
    if not isinstance(body, dict) or body.get("kind") != "DLC" or STANDIN_MARK not in body:
        fail(tool, f"{flag}: {value} is not a DLC (not a test-double stand-in)")
    return body
