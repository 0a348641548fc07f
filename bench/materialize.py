"""(c) Materializing a 5 GB store entry into the workspace vs copying it.

Run: .venv/bin/python bench/materialize.py [--gb 5] [--dir /tmp/kiln-bench]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import GB, make_payload, median_of, timed  # noqa: E402
from pipeline.engine.materialize import materialize  # noqa: E402
from pipeline.engine.store import Store  # noqa: E402

KEY = "b" * 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gb", type=float, default=5.0)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/kiln-bench"))
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    base = a.dir / "materialize"
    store = Store(base / "store")
    if store.output_of(KEY) is None:
        payload = make_payload(base / "payload", int(a.gb * GB), 10)
        scratch = store.new_scratch(KEY)
        for f in payload:
            os.link(f, scratch / "out" / f.name)
        store.publish(scratch, KEY, {"stage": "bench"})
    src = store.out(store.output_of(KEY))
    size = sum(f.stat().st_size for f in src.iterdir()) / GB
    dest = base / "ws" / "stage"
    methods: list[str] = []
    t_mat = median_of(a.runs, lambda: methods.append(materialize([src], dest)))
    copy_dest = base / "copy"
    shutil.rmtree(copy_dest, ignore_errors=True)
    t_copy = timed(lambda: shutil.copytree(src, copy_dest))
    shutil.rmtree(copy_dest)
    print(f"entry: {size:.2f} GB in {len(list(src.iterdir()))} files")
    print(f"materialize ({methods[-1]}): {t_mat * 1000:.1f} ms (median of {a.runs})")
    print(f"copy (shutil.copytree): {t_copy:.2f} s")
    print(f"ratio: {t_copy / t_mat:.0f}x")


if __name__ == "__main__":
    main()
