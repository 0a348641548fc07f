"""gc: drop store entries no listed recipe needs, by age and size budget; clear dead scratch."""
from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.engine.errors import KilnError
from pipeline.engine.plan import plan
from pipeline.engine.runner import ENTRY_MARK
from pipeline.engine.settings import Settings
from pipeline.engine.store import Store, remove_tree
from pipeline.recipe.load import available
from pipeline.registry import load_recipe


def needed_keys(settings: Settings, store_root: Path) -> set[str]:
    """Keys the recipes in recipes/ plan now, plus those any workspace points at."""
    keep: set[str] = set()
    for name in available(settings.recipes_dir):
        try:
            keep.update(s.key for s in plan(load_recipe(name, settings)) if s.store == store_root)
        except KilnError as e:
            print(f"gc: warning: recipe {name} does not plan ({e}); its entries are protected only by workspaces")
    for mark in settings.artifacts.glob(f"*/*/{ENTRY_MARK}"):
        try:
            keep.add(json.loads(mark.read_text())["key"])
        except (OSError, ValueError, KeyError):
            pass
    return keep


def gc(settings: Settings, store_root: Path, max_age_days: float, budget_gb: float | None,
       dry_run: bool = False) -> list[str]:
    store = Store(store_root)
    keep = needed_keys(settings, store_root)
    now = time.time()
    candidates = sorted((store.last_used(k), k) for k in store.keys() if k not in keep)
    sizes = {k: store.size(k) for k in store.keys()}
    total = sum(sizes.values())
    removed: list[str] = []
    for used, key in candidates:
        too_old = now - used > max_age_days * 86400
        over_budget = budget_gb is not None and total > budget_gb * 1e9
        if too_old or over_budget:
            removed.append(key)
            total -= sizes[key]
            if not dry_run:
                store.remove(key)
            why = "older than max age" if too_old else "over size budget"
            print(f"gc: {'would remove' if dry_run else 'removed'} {key[:16]}… "
                  f"({sizes[key] / 1e6:.1f} MB, {why})")
    for scratch in store.stale_scratch():
        print(f"gc: {'would remove' if dry_run else 'removed'} dead scratch {scratch.name}")
        if not dry_run:
            remove_tree(scratch)
    print(f"gc: kept {len(sizes) - len(removed)} entries ({total / 1e9:.2f} GB), "
          f"{len(keep & set(sizes))} needed by recipes/workspaces")
    return removed


# The options of both `python -m pipeline gc` and `doit gc`: (name, flag, type, default, help).
OPTIONS: tuple[tuple[str, str, type, object, str], ...] = (
    ("max_age_days", "--max-age-days", float, 30.0, "drop unneeded entries unused this many days"),
    ("budget_gb", "--budget-gb", float, None, "then drop least recently used unneeded entries until the store fits"),
    ("dry_run", "--dry-run", bool, False, "say what would go, remove nothing"),
)


def add_parser(sub) -> None:
    p = sub.add_parser("gc", help=__doc__)
    for name, flag, kind, default, text in OPTIONS:
        if kind is bool:
            p.add_argument(flag, dest=name, action="store_true", help=text)
        else:
            p.add_argument(flag, dest=name, type=kind, default=default, help=f"{text} (default: {default})")
    p.set_defaults(func=_main)


def _main(args, settings: Settings) -> int:
    gc(settings, settings.store_dir(), args.max_age_days, args.budget_gb, args.dry_run)
    return 0
