"""Running third-party tools from a stage: argv lists only, output to the stage log."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from pipeline.engine.errors import KilnError


def run_tool(argv: list[str | Path], *, env: dict[str, str] | None = None, cwd: Path | None = None,
             capture: bool = False, echo: bool = False, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run a tool (never through a shell). Its output streams into the stage log unless captured;
    `echo` does both (stdout and stderr merged into `.stdout`), for long tools whose own progress
    the user should see while their output is parsed afterwards.

    A non-zero exit raises KilnError naming the tool and, when captured, the end of its output.
    """
    args = [str(a) for a in argv]
    print("$ " + shlex.join(args), flush=True)  # for the log only; never executed as a string
    full_env = {**os.environ, **(env or {})}
    if capture and echo:
        if timeout is not None:
            raise ValueError("run_tool: echo takes no timeout (the output is read until the tool closes it)")
        proc = _echoed(args, full_env, cwd)
    else:
        proc = subprocess.run(args, env=full_env, cwd=cwd, stdin=subprocess.DEVNULL, timeout=timeout,
                              stdout=subprocess.PIPE if capture else sys.stdout,
                              stderr=subprocess.PIPE if capture else subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "" if not capture else "\n" + "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise KilnError(f"{Path(args[0]).name} exited with {proc.returncode}{tail}")
    return proc


def _echoed(args: list[str], env: dict[str, str], cwd: Path | None) -> subprocess.CompletedProcess:
    """Run `args`, copying its merged output to ours as it comes and keeping it."""
    kept = bytearray()
    with subprocess.Popen(args, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):
            kept += chunk
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        rc = proc.wait()
    return subprocess.CompletedProcess(args, rc, stdout=kept.decode(errors="replace"), stderr="")


def _count(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not (raw.isdigit() and 1 <= int(raw) <= 1024):
        raise KilnError(f"{name}={raw[:40]!r}: expected a whole number from 1 to 1024")
    return int(raw)


def threads() -> str:
    """Threads for host tools (llama.cpp's -t, MNN's thread_num): KILN_JOBS, else every core. Part
    of no key: results do not depend on it."""
    return str(_count("KILN_JOBS", os.cpu_count() or 2))


def build_jobs() -> str:
    """Parallel compile jobs (`cmake --build -j`): KILN_BUILD_JOBS, else as many as threads(). Apart
    from the threads because compilers do not spin while they wait as ggml's threads do: a test
    worker runs its tools on its share of the cores, yet compiles on all of them."""
    return str(_count("KILN_BUILD_JOBS", int(threads())))
