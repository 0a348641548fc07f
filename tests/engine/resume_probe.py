"""A stage for the runner's resume test (tests/engine/test_resume.py), run by its entry point
the way the planner names real stages: the first run leaves progress in ctx.resume and fails;
a later run of the same key finds that progress and finishes from it."""
from __future__ import annotations

from pipeline.engine.errors import KilnError
from pipeline.engine.stage import Stage, StageContext


class ResumeProbe(Stage):
    name = "resume_probe"
    version = 1

    def run(self, ctx: StageContext) -> None:
        progress = ctx.resume / "progress.txt"
        if not progress.exists():
            progress.write_text("layer 1 of 2\n")
            raise KilnError("resume_probe: failing after its first checkpoint")
        (ctx.out / "result.txt").write_text(f"resumed after {progress.read_text()}")
