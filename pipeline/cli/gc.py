"""gc: drop store outputs (and their action records) no listed recipe needs, by age and size
budget; drop dangling or old unneeded action records, entries of the old store layout and dead
scratch."""
from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.engine.errors import KilnError
from pipeline.engine.plan import plan
from pipeline.engine.runner import ENTRY_MARK
from pipeline.engine.settings import Settings
from pipeline.engine.store import LEGACY_ENTRIES, Store, remove_tree
from pipeline.recipe.load import available
from pipeline.registry import load_recipe


def live_recipes(settings: Settings, only: str) -> list[str]:
    """The recipes whose entries gc keeps: every recipe in recipes/, or the comma-separated `only`."""
    every = available(settings.recipes_dir)
    if not only:
        return every
    named = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in named if n not in every]
    if unknown:
        raise KilnError(f"gc --recipes: no recipe {', '.join(map(repr, unknown))[:200]} in {settings.recipes_dir}")
    return named


def needed(settings: Settings, store_root: Path, recipes: list[str]) -> tuple[set[str], set[str]]:
    """(action keys, output digests) `recipes` plan now, plus what any workspace holds."""
    keys: set[str] = set()
    outputs: set[str] = set()
    for name in recipes:
        try:
            for s in plan(load_recipe(name, settings)):
                if s.store == store_root:
                    keys.add(s.key)
                    outputs.update([s.output] if s.output else [])
        except (KilnError, OSError) as e:
            print(f"gc: warning: recipe {name} skipped, it does not plan ({str(e).splitlines()[0]}); "
                  "its entries are protected only by workspaces and the grace period")
    for mark in settings.artifacts.glob(f"*/*/{ENTRY_MARK}"):
        try:
            held = json.loads(mark.read_text())
            keys.add(held["key"])
            outputs.add(held["output"])
        except (OSError, ValueError, KeyError):
            pass
    return keys, outputs


GRACE_S = 3600.0  # an entry used this recently may serve a build in another checkout right now


def inode_sizes(store: Store, digests: list[str]) -> tuple[dict[str, set[tuple[int, int]]], dict[tuple[int, int], int]]:
    """({digest: its files' inodes}, {inode: bytes}): hard links (bundles link their inputs' files)
    counted once, so removing an output frees only the bytes no other output still holds."""
    inodes: dict[str, set[tuple[int, int]]] = {}
    sizes: dict[tuple[int, int], int] = {}
    for digest in digests:
        inodes[digest] = set()
        for f in store.output(digest).rglob("*"):
            st = f.lstat()
            if f.is_file() and not f.is_symlink():
                inodes[digest].add((st.st_dev, st.st_ino))
                sizes[(st.st_dev, st.st_ino)] = st.st_size
    return inodes, sizes


def gc(settings: Settings, store_root: Path, max_age_days: float, budget_gb: float | None,
       dry_run: bool = False, recipes: str = "", remote: bool = False) -> list[str]:
    """Remove what is not needed; return the output digests removed."""
    if remote:
        return _gc_remote(settings, store_root, max_age_days, budget_gb, dry_run, recipes)
    store = Store(store_root)
    keep_keys, keep_outputs = needed(settings, store_root, live_recipes(settings, recipes))
    now = time.time()
    verb = "would remove" if dry_run else "removed"
    records = {k: r for k in store.actions() if (r := store.record(k))}
    makers: dict[str, list[str]] = {}
    for key, rec in records.items():
        makers.setdefault(rec["output"], []).append(key)
    keep_outputs |= {records[k]["output"] for k in keep_keys if k in records}
    digests = list(store.outputs())
    inodes, sizes = inode_sizes(store, digests)
    holders: dict[tuple[int, int], int] = {}
    for owned in inodes.values():
        for inode in owned:
            holders[inode] = holders.get(inode, 0) + 1
    total = sum(sizes.values())

    def busy(path: Path, keys: list[str]) -> bool:
        """Used within the grace period, or a live lock is rebuilding one of its keys."""
        return now - store.last_used(path) < GRACE_S or any(
            store.lock(k).path.exists() and not store.lock(k).is_stale() for k in keys)

    removed: list[str] = []
    for used, digest in sorted((store.last_used(store.output(d)), d) for d in digests if d not in keep_outputs):
        if busy(store.output(digest), makers.get(digest, [])):
            continue
        too_old = now - used > max_age_days * 86400
        if not too_old and (budget_gb is None or total <= budget_gb * 1e9):
            continue
        freed = 0
        for inode in inodes[digest]:
            holders[inode] -= 1
            freed += sizes[inode] if holders[inode] == 0 else 0
        total -= freed
        removed.append(digest)
        if not dry_run:
            store.remove_output(digest)
        why = "older than max age" if too_old else "over size budget"
        print(f"gc: {verb} output {digest[:16]}… ({freed / 1e6:.1f} MB freed, {why}; "
              f"{len(makers.get(digest, []))} action record(s) with it)")
    dropped = 0
    for key, rec in records.items():
        orphan = not store.has_output(rec["output"])  # its output was quarantined or removed
        old = now - store.last_used(store.action(key)) > max_age_days * 86400
        unneeded = key not in keep_keys and (orphan or old) and not busy(store.action(key), [key])
        if rec["output"] in removed or unneeded:
            dropped += 1
            if not dry_run:
                store.remove_action(key)
    legacy = store.root / LEGACY_ENTRIES
    if legacy.is_dir() and now - legacy.stat().st_mtime >= GRACE_S:
        print(f"gc: {verb} {legacy} (the store layout before output digests; this Kiln never reads it)")
        if not dry_run:
            remove_tree(legacy)
    for state in store.stale_resume(max_age_days * 86400):
        print(f"gc: {verb} resume state {state.name[:16]}… (published since, or untouched for {max_age_days:g} days)")
        if not dry_run:
            remove_tree(state)
    for scratch in store.stale_scratch():
        print(f"gc: {verb} dead scratch {scratch.name}")
        if not dry_run:
            remove_tree(scratch)
    print(f"gc: kept {len(digests) - len(removed)} outputs ({total / 1e9:.2f} GB), "
          f"{len(keep_outputs & set(digests))} needed by recipes/workspaces; "
          f"{len(records) - dropped} action records ({dropped} {'would go' if dry_run else 'dropped'})")
    return removed


def _gc_remote(settings: Settings, store_root: Path, max_age_days: float, budget_gb: float | None, dry_run: bool,
               recipes: str) -> list[str]:
    """The remote tier keeps the records the live recipes plan now (as far as this checkout's store
    resolves their keys) and those pushed within --max-age-days; what no kept record names goes."""
    tier = settings.remote_tier()
    if tier is None:
        raise KilnError("gc --remote: no remote tier is configured (KILN_REMOTE or [tool.kiln.store].remote)")
    if budget_gb is not None:
        raise KilnError("gc --remote: --budget-gb applies to the local store only (a bucket is billed, not full)")
    keep, _ = needed(settings, store_root, live_recipes(settings, recipes))
    tier.gc(keep, max_age_days * 86400, GRACE_S, dry_run, print)
    return []


# The options of both `python -m pipeline gc` and `doit gc`: (name, flag, type, default, help).
OPTIONS: tuple[tuple[str, str, type, object, str], ...] = (
    ("max_age_days", "--max-age-days", float, 30.0, "drop unneeded entries unused this many days"),
    ("budget_gb", "--budget-gb", float, None, "then drop least recently used unneeded entries until the store fits"),
    ("dry_run", "--dry-run", bool, False, "say what would go, remove nothing"),
    ("recipes", "--recipes", str, "", "comma-separated recipes whose entries stay (default: every recipe in recipes/)"),
    ("remote", "--remote", bool, False, "collect the remote tier (records, then what no record names), not the local store"),
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
    gc(settings, settings.store_dir(), args.max_age_days, args.budget_gb, args.dry_run, args.recipes, args.remote)
    return 0
