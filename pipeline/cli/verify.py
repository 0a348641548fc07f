"""verify: re-hash every stored output against its manifest; quarantine mismatches. With
--remote: re-read every blob of the remote tier; delete the records of entries found bad."""
from __future__ import annotations

from pathlib import Path

from pipeline.engine.errors import KilnError
from pipeline.engine.settings import Settings
from pipeline.engine.store import Store, file_manifest


def verify(store_root: Path, only: set[str] | None = None) -> tuple[int, list[str]]:
    """Return (outputs checked, digests quarantined); `only` limits the check to those digests."""
    store = Store(store_root)
    bad: list[str] = []
    digests = [d for d in store.outputs() if only is None or d in only]
    for digest in digests:
        recorded = store.manifest(digest)["files"]
        actual = file_manifest(store.out(digest))
        if actual != recorded:
            changed = sorted(f for f in set(recorded) | set(actual) if recorded.get(f) != actual.get(f))
            dest = store.quarantine(digest)
            bad.append(digest)
            print(f"verify: {digest[:16]}… MISMATCH in {', '.join(changed)}; moved to {dest}")
    print(f"verify: {len(digests)} outputs checked, {len(bad)} quarantined")
    return len(digests), bad


def verify_remote(settings: Settings) -> list[str]:
    """The action keys whose remote entries were bad (and are deleted now)."""
    tier = settings.remote_tier()
    if tier is None:
        raise KilnError("verify --remote: no remote tier is configured (KILN_REMOTE or [tool.kiln.store].remote)")
    return tier.verify(print)


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help=__doc__)
    p.add_argument("--remote", action="store_true", help="re-read the remote tier's blobs, not the local store")
    p.set_defaults(func=lambda a, s: 1 if (verify_remote(s) if a.remote else verify(s.store_dir())[1]) else 0)
