"""doit glue: planned stages → doit task dicts. Imported by dodo.py.

One task per stage, `<recipe>:<stage>`, plus a group task `<recipe>` (the
default). Up-to-date is one cheap check over the action key, settled against
the store when doit asks (after the stage's inputs ran: runner.is_up_to_date):
no file_dep, so doit never md5s a large file.
"""
from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from typing import Any

from doit.exceptions import TaskFailed

from pipeline.cli.build_page import write_build_page
from pipeline.cli.costs import write_page
from pipeline.engine.errors import KilnError
from pipeline.engine.plan import StageSpec, plan
from pipeline.engine.run_stage import stage_entry
from pipeline.engine.runner import build, is_up_to_date, say
from pipeline.engine.settings import Settings
from pipeline.recipe.load import Recipe
from pipeline.registry import load_recipe


class Terminated(KeyboardInterrupt):
    """SIGTERM (a `kill`, a CI job's timeout): stopped like Ctrl-C, so the running stage's process
    group is ended, its scratch removed and its lock released (exit 143, not 130)."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def _stopped(e: KeyboardInterrupt) -> SystemExit:
    """The exit of a build stopped by Ctrl-C (130) or SIGTERM (143)."""
    return SystemExit(143 if isinstance(e, Terminated) else 130)


def settings_or_exit() -> Settings:
    """Settings from the environment and pyproject; a bad value ends the process with the message, exit 2.
    From here on SIGTERM stops the build as Ctrl-C does."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return Settings.from_env()
    except KilnError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def load_or_exit(name: str, settings: Settings) -> tuple[Recipe, list[StageSpec]]:
    """Recipe errors end the process with the message alone (no traceback), exit 2."""
    try:
        recipe = load_recipe(name, settings)
        specs = plan(recipe)
    except KilnError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as e:
        raise _stopped(e) from None
    for note in recipe.notes:
        say(note)
    return recipe, specs


def _action(spec: StageSpec, specs: list[StageSpec], settings: Settings) -> Any:
    def run() -> Any:
        try:
            build(spec, specs, settings)
        except KilnError as e:
            return TaskFailed(str(e))
        except KeyboardInterrupt as e:
            how = "terminated" if isinstance(e, Terminated) else "interrupted"
            print(f"\nkiln: {how} {spec.task_name}: nothing of it was published, its lock is released; "
                  f"run the same command again to resume", file=sys.stderr, flush=True)
            raise _stopped(e) from None
        if spec.stage == "bundle":
            tar = spec.workspace / f"{spec.recipe}.tar.gz"
            say(f"bundle ready: {settings.shown(spec.workspace / 'to_device')} (tarball {settings.shown(tar)})")
            for line in headlines(specs):
                say(line)
            say(f"stage costs: {settings.shown(write_page(spec.recipe, specs, settings))}")
            if page := write_build_page(spec.recipe, specs, settings):
                say(f"report: {settings.shown(page.with_name('index.html'))} (build details: {page.name})")
        return None
    return run


def headlines(specs: list[StageSpec]) -> list[str]:
    """What the recipe's stages report at the end (a runtime's answer, ...), from their workspaces."""
    lines = []
    for spec in specs:
        line = stage_entry(spec.entry).headline(spec.workspace)
        if line:
            lines.append(f"{spec.stage}: {line}")
    return lines


def _doc(spec: StageSpec) -> str:
    doc = f"stage {spec.stage} (key {spec.key[:12]}…)"
    return doc + (f", provisional: depends on the output of {spec.pending}, not built yet" if spec.pending else "")


def stage_tasks(recipe: Recipe, specs: list[StageSpec], settings: Settings) -> Iterator[dict[str, Any]]:
    by_id = {s.stage: s for s in specs}
    for spec in specs:
        yield {
            "basename": spec.task_name,
            "doc": _doc(spec),
            "actions": [(_action(spec, specs, settings), [], {})],
            "task_dep": [by_id[d].task_name for d in spec.input_nodes],
            "uptodate": [lambda s=spec: is_up_to_date(s, specs)],
            "verbosity": 2,
        }
    yield {
        "basename": recipe.name,
        "doc": recipe.spec.description or f"build recipe {recipe.name}",
        "actions": None,
        "task_dep": [s.task_name for s in specs],
    }
