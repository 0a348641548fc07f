"""doit tasks over the store: `doit explain`, `doit gc`, `doit verify`."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pipeline.cli.explain import explain
from pipeline.cli.gc import gc
from pipeline.cli.verify import verify
from pipeline.engine.settings import Settings
from pipeline.recipe.load import Recipe


def store_tasks(recipe: Recipe, settings: Settings) -> Iterator[dict[str, Any]]:
    store = settings.store_dir(recipe.spec.store)
    yield {
        "basename": "explain", "doc": "which stages of recipe=X would run, and why",
        "actions": [lambda: print("\n".join(explain(recipe.name, settings)))],
        "uptodate": [False], "verbosity": 2,
    }
    yield {
        "basename": "gc", "doc": "drop unneeded store entries (--max-age-days, --budget-gb, --dry-run)",
        "params": [
            {"name": "max_age_days", "long": "max-age-days", "type": float, "default": 30.0},
            {"name": "budget_gb", "long": "budget-gb", "type": float, "default": 1e12},
            {"name": "dry_run", "long": "dry-run", "type": bool, "default": False},
        ],
        "actions": [lambda max_age_days, budget_gb, dry_run: gc(settings, store, max_age_days, budget_gb, dry_run) and None],
        "uptodate": [False], "verbosity": 2,
    }
    yield {
        "basename": "verify", "doc": "re-hash store entries, quarantine mismatches",
        "actions": [lambda: not verify(store)[1]],
        "uptodate": [False], "verbosity": 2,
    }
