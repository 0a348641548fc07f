"""Child-process entry point: `python -m pipeline.run_stage <job.json>`.

Runs one stage's `run` with the job's params, inputs and sources, writing only
into the job's `out` directory. The parent (runner.py) publishes the result.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from .errors import KilnError
from .stage import Stage, StageContext


def main(job_file: str) -> int:
    from . import stages  # noqa: F401  (registers stages)

    job = json.loads(Path(job_file).read_text())
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    ctx = StageContext(
        recipe_name=job["recipe"], variant=job["variant"], params=job["params"],
        inputs={k: Path(v) for k, v in job["inputs"].items()},
        sources={k: Path(v) for k, v in job["sources"].items()},
        out=Path(job["out"]), key=job["key"], cache=Path(job["cache"]), tools=job["tools"],
        input_keys=job["input_keys"], input_tools=job["input_tools"],
        log=logging.getLogger(f"kiln.{job['stage']}"),
    )
    try:
        Stage.registry[job["stage"]]().run(ctx)
    except KilnError as e:
        print(f"error: {e}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
