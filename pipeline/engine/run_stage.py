"""Child-process entry point: `python -m pipeline.engine.run_stage <job.json>`.

Runs one stage's `run` with the job's params, inputs and sources, writing only
into the job's `out` directory. The parent (runner.py) publishes the result.
"""
from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path

from pipeline.engine.errors import KilnError
from pipeline.engine.stage import Stage, StageContext


def stage_entry(entry: str) -> type[Stage]:
    """"module:Class" (the plan's StageSpec.entry) → the class, imported here: the engine
    names no backend, the plan says which module holds the stage."""
    module, _, qualname = entry.partition(":")
    cls = getattr(importlib.import_module(module), qualname)
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise TypeError(f"{entry} is not a Stage")
    return cls


def main(job_file: str) -> int:
    job = json.loads(Path(job_file).read_text())
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    ctx = StageContext(
        recipe_name=job["recipe"], variant=job["variant"], params=job["params"],
        inputs={k: Path(v) for k, v in job["inputs"].items()},
        sources={k: Path(v) for k, v in job["sources"].items()},
        out=Path(job["out"]), tmp=Path(job["tmp"]), key=job["key"], cache=Path(job["cache"]), tools=job["tools"],
        input_keys=job["input_keys"], input_tools=job["input_tools"],
        log=logging.getLogger(f"kiln.{job['stage']}"),
    )
    try:
        stage_entry(job["entry"])().run(ctx)
    except KilnError as e:
        print(f"error: {e}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
