"""verify: re-hash every store entry against its meta.json; quarantine mismatches."""
from __future__ import annotations

from pathlib import Path

from pipeline.engine.store import Store, file_manifest


def verify(store_root: Path, only: set[str] | None = None) -> tuple[int, list[str]]:
    """Return (entries checked, keys quarantined); `only` limits the check to those keys."""
    store = Store(store_root)
    bad: list[str] = []
    keys = [k for k in store.keys() if only is None or k in only]
    for key in keys:
        recorded = store.meta(key).get("files", {})
        actual = file_manifest(store.out(key))
        if actual != recorded:
            changed = sorted(f for f in set(recorded) | set(actual) if recorded.get(f) != actual.get(f))
            dest = store.quarantine(key)
            bad.append(key)
            print(f"verify: {key[:16]}… MISMATCH in {', '.join(changed)}; moved to {dest}")
    print(f"verify: {len(keys)} entries checked, {len(bad)} quarantined")
    return len(keys), bad


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help=__doc__)
    p.set_defaults(func=lambda a, s: 1 if verify(s.store_dir())[1] else 0)
