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
        except (KilnError, OSError) as e:
            print(f"gc: warning: recipe {name} skipped, it does not plan ({str(e).splitlines()[0]}); "
                  "its entries are protected only by workspaces and the grace period")
    for mark in settings.artifacts.glob(f"*/*/{ENTRY_MARK}"):
        try:
            keep.add(json.loads(mark.read_text())["key"])
        except (OSError, ValueError, KeyError):
            pass
    return keep


GRACE_S = 3600.0  # an entry used this recently may serve a build in another checkout right now


def inode_sizes(store: Store, keys: list[str]) -> tuple[dict[str, set[tuple[int, int]]], dict[tuple[int, int], int]]:
    """({key: its files' inodes}, {inode: bytes}): hard links (bundles link their inputs' files)
    counted once, so removing an entry frees only the bytes no other entry still holds."""
    inodes: dict[str, set[tuple[int, int]]] = {}
    sizes: dict[tuple[int, int], int] = {}
    for key in keys:
        inodes[key] = set()
        for f in store.entry(key).rglob("*"):
            st = f.lstat()
            if f.is_file() and not f.is_symlink():
                inodes[key].add((st.st_dev, st.st_ino))
                sizes[(st.st_dev, st.st_ino)] = st.st_size
    return inodes, sizes


def gc(settings: Settings, store_root: Path, max_age_days: float, budget_gb: float | None,
       dry_run: bool = False) -> list[str]:
    store = Store(store_root)
    keep = needed_keys(settings, store_root)
    now = time.time()
    keys = list(store.keys())
    inodes, sizes = inode_sizes(store, keys)
    holders: dict[tuple[int, int], int] = {}
    for owned in inodes.values():
        for inode in owned:
            holders[inode] = holders.get(inode, 0) + 1
    total = sum(sizes.values())
    removed: list[str] = []
    for used, key in sorted((store.last_used(k), k) for k in keys if k not in keep):
        if now - used < GRACE_S or store.lock(key).path.exists() and not store.lock(key).is_stale():
            continue  # just built or used (maybe by another checkout), or being rebuilt
        too_old = now - used > max_age_days * 86400
        if not too_old and (budget_gb is None or total <= budget_gb * 1e9):
            continue
        freed = 0
        for inode in inodes[key]:
            holders[inode] -= 1
            freed += sizes[inode] if holders[inode] == 0 else 0
        total -= freed
        removed.append(key)
        if not dry_run:
            store.remove(key)
        why = "older than max age" if too_old else "over size budget"
        print(f"gc: {'would remove' if dry_run else 'removed'} {key[:16]}… ({freed / 1e6:.1f} MB freed, {why})")
    for scratch in store.stale_scratch():
        print(f"gc: {'would remove' if dry_run else 'removed'} dead scratch {scratch.name}")
        if not dry_run:
            remove_tree(scratch)
    print(f"gc: kept {len(keys) - len(removed)} entries ({total / 1e9:.2f} GB), "
          f"{len(keep & set(keys))} needed by recipes/workspaces")
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
