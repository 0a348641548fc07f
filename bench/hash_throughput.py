"""(b) Source hashing throughput (BLAKE3, as Kiln hashes sources) vs `cat file >/dev/null`.

Run: .venv/bin/python bench/hash_throughput.py [--gb 2] [--dir /tmp/kiln-bench]
Prints throughputs and the ratio hash/cat, cold (pages evicted before each
read: what hashing a fresh checkpoint costs) and warm (page cache), each a
median over --runs runs.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import GB, evict, make_payload, median_of  # noqa: E402
from pipeline.engine.hashing import hash_file_bytes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/kiln-bench"))
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    (path,) = make_payload(a.dir / "hash", int(a.gb * GB), 1)
    size = path.stat().st_size / GB

    def cat() -> None:
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)

    def kiln_hash() -> None:
        hash_file_bytes(path)

    for label, before in (("cold", lambda: evict(path)), ("warm", lambda: None)):
        cat()  # warm-up for the warm case; harmless for the cold one
        t_cat = median_of(a.runs, cat, before)
        t_hash = median_of(a.runs, kiln_hash, before)
        print(f"{label}: cat {size / t_cat:.2f} GB/s, blake3 {size / t_hash:.2f} GB/s, "
              f"ratio hash/cat = {t_cat / t_hash:.0%}")


if __name__ == "__main__":
    main()
