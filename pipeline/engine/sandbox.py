"""Run a third-party Python tool with no network and no pip, and fail loudly when it tries.

MNN's tools run `pip install` on import and post telemetry (docs/mnn.md#pip-and-telemetry); a build must neither change
the environment it is keyed on nor depend on the network. Three layers:

- `sandbox_site/sitecustomize.py`, first on the child's PYTHONPATH: an audit hook refusing
  connections and DNS lookups to anything but localhost and any process that runs pip, logging
  each refusal to a file (a tool may swallow the exception; the log still fails the stage);
- `pip`/`pip3` at the front of PATH that refuse and log (for non-Python children);
- a new network namespace (`unshare --net`) where the kernel allows one, so not even C code
  reaches the network; proxies point at a closed local port where it does not.

After the tool exits, any logged attempt raises KilnError naming it, before the exit code is
looked at.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from pipeline.engine.errors import KilnError
from pipeline.engine.proc import run_tool

SITE = Path(__file__).parent / "sandbox_site"
REFUSING_PIP = """#!/bin/sh
echo "Kiln sandbox: pip $* refused (no pip inside a build)" >&2
printf 'pip: %s\\n' "$*" >> "$KILN_SANDBOX_LOG"
exit 1
"""
CLOSED_PORT = "http://127.0.0.1:9"  # discard port: nothing listens, connections are refused


@cache
def network_namespace() -> list[str]:
    """`unshare` argv prefix giving the child an empty network namespace, or [] where not allowed."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    for argv in ([unshare, "--net"], [unshare, "--map-root-user", "--net"]):
        if subprocess.run([*argv, "true"], capture_output=True).returncode == 0:
            return argv
    return []


def run_sandboxed(argv: list[str | Path], *, what: str, env: dict[str, str] | None = None,
                  cwd: Path | None = None, timeout: float | None = None) -> None:
    """Run `argv` (a Python tool) sandboxed; `what` names it in errors."""
    with tempfile.TemporaryDirectory(prefix="kiln-sandbox-") as tmp:
        bin_dir, log = Path(tmp) / "bin", Path(tmp) / "refused.log"
        bin_dir.mkdir()
        for name in ("pip", "pip3"):
            (bin_dir / name).write_text(REFUSING_PIP)
            (bin_dir / name).chmod(0o755)
        log.touch()
        extra = env or {}
        python_path = os.pathsep.join(p for p in (str(SITE), extra.get("PYTHONPATH", "")) if p)
        sandbox_env = {
            **extra, "PYTHONPATH": python_path, "KILN_SANDBOX_LOG": str(log),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            **{k: CLOSED_PORT for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")},
            "no_proxy": "", "NO_PROXY": "",
        }
        failure: KilnError | None = None
        try:
            run_tool([*network_namespace(), *argv], env=sandbox_env, cwd=cwd, timeout=timeout)
        except KilnError as e:
            failure = e
        refused = log.read_text().splitlines()
        if refused:
            raise KilnError(f"{what} tried to reach outside Kiln's sandbox (no network, no pip during a build): "
                            + "; ".join(dict.fromkeys(refused)))
        if failure is not None:
            raise KilnError(f"{what} failed: {failure}") from None
