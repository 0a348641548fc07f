"""doit tasks over the store: `doit explain`, `doit reproduce`, `doit gc`, `doit verify`."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed

from pipeline.cli.explain import explain
from pipeline.cli.gc import OPTIONS as GC_OPTIONS
from pipeline.cli.gc import gc
from pipeline.cli.reproduce import reproduce, summary
from pipeline.cli.verify import verify, verify_remote
from pipeline.engine.errors import KilnError
from pipeline.engine.settings import Settings
from pipeline.recipe.load import Recipe


def store_tasks(recipe: Recipe, settings: Settings) -> Iterator[dict[str, Any]]:
    store = settings.store_dir()
    yield {
        "basename": "explain", "doc": "which stages of recipe=X would run, and why",
        "actions": [lambda: print("\n".join(explain(recipe.name, settings)))],
        "uptodate": [False], "verbosity": 2,
    }
    yield {
        "basename": "reproduce", "doc": "rebuild recipe=X's stages in an empty store and compare every output file",
        "params": [{"name": "stages", "long": "stages", "type": str, "default": "",
                    "help": "comma-separated stage ids (default: every stage)"}],
        "actions": [lambda stages: _reproduce(recipe.name, settings, stages)],
        "uptodate": [False], "verbosity": 2,
    }
    yield {
        "basename": "gc", "doc": "drop unneeded store entries (--max-age-days, --budget-gb, --dry-run)",
        "params": [{"name": name, "long": flag.removeprefix("--"), "type": kind, "default": default, "help": text}
                   for name, flag, kind, default, text in GC_OPTIONS],
        "actions": [lambda max_age_days, budget_gb, dry_run, recipes, remote: _gc(
            settings, store, max_age_days, budget_gb, dry_run, recipes, remote)],
        "uptodate": [False], "verbosity": 2,
    }
    yield {
        "basename": "verify", "doc": "re-hash store entries, quarantine mismatches (--remote: the remote tier's)",
        "params": [{"name": "remote", "long": "remote", "type": bool, "default": False,
                    "help": "re-read the remote tier's blobs; delete the records of bad entries"}],
        "actions": [lambda remote: _verify(settings, store, remote)],
        "uptodate": [False], "verbosity": 2,
    }


def _gc(settings: Settings, store: Path, max_age_days: float, budget_gb: float | None, dry_run: bool,
        recipes: str, remote: bool) -> None | TaskFailed:
    """gc as a doit action: None whatever it removed (doit fails an action that returns a list)."""
    try:
        gc(settings, store, max_age_days, budget_gb, dry_run, recipes, remote)
    except KilnError as e:
        return TaskFailed(str(e))
    return None


def _verify(settings: Settings, store: Path, remote: bool) -> bool | TaskFailed:
    try:
        return not (verify_remote(settings) if remote else verify(store)[1])
    except KilnError as e:
        return TaskFailed(str(e))


def _reproduce(recipe: str, settings: Settings, stages: str) -> bool | TaskFailed:
    try:
        report = reproduce(recipe, settings, [s for s in stages.split(",") if s] or None)
    except KilnError as e:
        return TaskFailed(str(e))
    print(summary(recipe, report))
    return not any(report.values())
