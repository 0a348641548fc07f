"""Loaded by every Python process Kiln starts through pipeline.engine.sandbox (this directory is first on
its PYTHONPATH): refuses network access and pip, and writes each refusal to $KILN_SANDBOX_LOG so
the stage fails loudly even when the tool swallows the exception.

Mechanism: a PEP 578 audit hook (it cannot be removed by the code it watches). Known telemetry is
switched off before it can run: MNN's Python tools import `MNN.tools.utils.log`, which runs
`pip install -U aliyun-log-python-sdk` and posts to Aliyun (docs/mnn.md#pip-and-telemetry); its module is replaced by one
whose `mnn_logger` is None — the value MNN itself falls back to when the logger cannot load.
"""
import os
import re
import socket
import sys
import types

_LOG = os.environ.get("KILN_SANDBOX_LOG", "")
_LOCAL_HOSTS = {None, "", "localhost", "127.0.0.1", "::1", b"localhost", b"127.0.0.1", b"::1"}
_PIP_WORD = re.compile(r"(^|[\s/;&|(])(pip[0-9.]*|ensurepip)(\s|$)")


def _refuse(what: str) -> None:
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as f:
            f.write(what.replace("\n", " ") + "\n")
    raise PermissionError(f"Kiln sandbox: {what} refused (no network and no pip inside a build)")


def _command(argv) -> str:
    words = [argv] if isinstance(argv, (str, bytes)) else list(argv or ())
    return " ".join(os.fsdecode(w) for w in words)


def _is_pip(command: str) -> bool:
    """pip run directly, as `python -m pip`, or inside a shell command line."""
    return bool(_PIP_WORD.search(command) or re.search(r"-m\s+(pip|ensurepip)\b", command))


def _hook(event: str, args: tuple) -> None:
    if event == "socket.connect" or event == "socket.sendto":
        sock, address = args[0], args[1]
        if getattr(sock, "family", None) != socket.AF_UNIX and not (
                isinstance(address, tuple) and address and address[0] in _LOCAL_HOSTS):
            _refuse(f"network: connect to {address!r}")
    elif event == "socket.getaddrinfo":
        if args[0] not in _LOCAL_HOSTS:
            _refuse(f"network: DNS lookup of {args[0]!r}")
    elif event == "os.system" or event in ("subprocess.Popen", "os.posix_spawn", "os.exec"):
        command = _command(args[0] if event == "os.system" else args[1])
        if _is_pip(command):
            _refuse(f"pip: {event}: {command!r}")


if _LOG:
    sys.addaudithook(_hook)
    _quiet = types.ModuleType("MNN.tools.utils.log")
    _quiet.mnn_logger = None
    sys.modules["MNN.tools.utils.log"] = _quiet
