"""Child-process entry point: `python -m pipeline.engine.run_stage <job.json>`.

Runs one stage's `run` with the job's params, inputs and sources, writing only
into the job's `out` directory. The parent (runner.py) publishes the result.
"""
from __future__ import annotations

import ctypes
import importlib
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from pipeline.engine.errors import TRANSIENT_EXIT, KilnError, ToolFlaked
from pipeline.engine.stage import Stage, StageContext


def stage_entry(entry: str) -> type[Stage]:
    """"module:Class" (the plan's StageSpec.entry) → the class, imported here: the engine
    names no backend, the plan says which module holds the stage."""
    module, _, qualname = entry.partition(":")
    cls = getattr(importlib.import_module(module), qualname)
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise TypeError(f"{entry} is not a Stage")
    return cls


PR_SET_PDEATHSIG = 1
RUNNER_PID_ENV = "KILN_RUNNER_PID"


def die_with_the_runner() -> None:
    """The stage (its own process group, tools included) must not outlive the builder that holds
    its lock: a kill -9 of `doit` would otherwise leave a 20 GB export running beside the next
    one. The kernel signals us when the runner dies (Linux parent-death signal), and a watchdog
    thread checks too (a Python signal handler waits for a long C call to return)."""
    runner = int(os.environ.get(RUNNER_PID_ENV, "0"))
    if not runner:
        return

    def kill_group(*_: object) -> None:
        os.killpg(os.getpgrp(), signal.SIGKILL)

    signal.signal(signal.SIGTERM, kill_group)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the watchdog alone

    def watchdog() -> None:
        while os.getppid() == runner:
            threading.Event().wait(0.5)
        kill_group()

    if os.getppid() != runner:
        kill_group()
    threading.Thread(target=watchdog, daemon=True, name="runner-watchdog").start()


def main(job_file: str) -> int:
    die_with_the_runner()
    job = json.loads(Path(job_file).read_text())
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    ctx = StageContext(
        recipe_name=job["recipe"], variant=job["variant"], params=job["params"],
        inputs={k: Path(v) for k, v in job["inputs"].items()},
        sources={k: Path(v) for k, v in job["sources"].items()},
        out=Path(job["out"]), info=Path(job["info"]), tmp=Path(job["tmp"]), key=job["key"],
        cache=Path(job["cache"]), resume=Path(job["resume"]), tools=job["tools"],
        input_outputs=job["input_outputs"],
        log=logging.getLogger(f"kiln.{job['stage']}"),
    )
    try:
        stage_entry(job["entry"])().run(ctx)
    except ToolFlaked as e:
        print(f"error: {e} (a failure a rerun is known to get past)", flush=True)
        return TRANSIENT_EXIT
    except KilnError as e:
        print(f"error: {e}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
