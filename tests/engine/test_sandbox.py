"""pipeline.engine.sandbox: a tool that tries pip or the network fails loudly (even when it swallows the
refusal), a well-behaved one runs, and MNN's real converter makes no attempt inside it."""
from __future__ import annotations

import sys
import textwrap

import pytest

from pipeline.engine.errors import KilnError
from pipeline.engine.sandbox import run_sandboxed


def tool(tmp_path, body: str) -> list[str]:
    script = tmp_path / "tool.py"
    script.write_text(textwrap.dedent(body))
    return [sys.executable, str(script)]


@pytest.mark.parametrize("body, refused", [
    ("import os\nos.system('pip install -U aliyun-log-python-sdk')\n",
     "pip: os.system: 'pip install -U aliyun-log-python-sdk'"),
    ("import subprocess, sys\nsubprocess.run([sys.executable, '-m', 'pip', 'install', 'x'])\n", "-m pip install x"),
    ("import socket\ntry:\n    socket.create_connection(('pypi.org', 443), timeout=2)\nexcept Exception:\n    pass\n",
     "network: DNS lookup of 'pypi.org'"),
    ("import socket\ns = socket.socket()\ntry:\n    s.connect(('192.0.2.1', 80))\nexcept Exception:\n    pass\n",
     "network: connect to ('192.0.2.1', 80)"),
], ids=["os.system-pip", "python-m-pip", "dns", "connect"])
def test_attempts_fail_the_run_even_when_the_tool_swallows_them(tmp_path, body, refused):
    with pytest.raises(KilnError, match="tried to reach outside Kiln's sandbox") as e:
        run_sandboxed(tool(tmp_path, body), what="toy tool")
    assert refused in str(e.value)


def test_a_shell_child_meets_the_refusing_pip_on_path(tmp_path):
    with pytest.raises(KilnError, match=r"pip: install x"):
        run_sandboxed(["/bin/sh", "-c", "pip install x; true"], what="shell tool")


def test_a_well_behaved_tool_runs_and_its_own_failure_is_reported(tmp_path):
    out = tmp_path / "out.txt"
    run_sandboxed(tool(tmp_path, f"import socket\nsocket.getaddrinfo('localhost', 80)\nopen({str(out)!r}, 'w').write('ok')\n"),
                  what="toy tool")
    assert out.read_text() == "ok"
    with pytest.raises(KilnError, match="toy tool failed: .*exited with 3"):
        run_sandboxed(tool(tmp_path, "raise SystemExit(3)\n"), what="toy tool")


def test_mnn_converter_imports_without_pip_or_telemetry(tmp_path):
    pytest.importorskip("MNN")
    marker = tmp_path / "logger.txt"
    run_sandboxed(tool(tmp_path,
                       f"from MNN.tools import mnnconvert\nopen({str(marker)!r}, 'w').write(repr(mnnconvert.mnn_logger))\n"),
                  what="mnnconvert import")
    assert marker.read_text() == "None"
