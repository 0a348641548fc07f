"""Remote tier throughput: push and pull of one store entry through an S3 endpoint (moto's
server on 127.0.0.1, started here) vs `cp -r` of the same bytes on this disk, in one run.

Run: .venv/bin/python bench/remote_tier.py [--gb 1] [--files 4] [--dir /tmp/kiln-bench-remote]
Prints seconds and MB/s of: cp -r, push (blobs multipart, 16 MiB parts x 2 in flight, each part
SHA-256-checked by the server, then HEADs, manifest, record), pull into an empty store (one
streamed GET per file, BLAKE3 on the way, publish), and the ratios push/cp, pull/cp. moto keeps
objects in spooled temp files and serves GETs from them: a real S3 or MinIO has other figures
(network-bound); what this shows is Kiln's own overhead and that memory stays flat.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.engine.objstore import Bucket  # noqa: E402
from pipeline.engine.remote import RemoteTier  # noqa: E402
from pipeline.engine.store import Store  # noqa: E402
from tests.s3_server import CREDENTIALS, start_server  # noqa: E402  (the test suite's moto server)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/kiln-bench-remote"))
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    os.environ.update(CREDENTIALS)
    server = start_server(args.dir / "s3")
    try:
        store = Store(args.dir / "a")
        key = uuid.uuid4().hex * 2
        scratch = store.new_scratch(key)
        size = int(args.gb * (1 << 30) / args.files)
        for i in range(args.files):
            with open(scratch / "out" / f"part{i}.bin", "wb") as f:
                for _ in range(0, size, 16 << 20):
                    f.write(os.urandom(min(16 << 20, size)))
        digest, _ = store.publish(scratch, key, {"stage": "bench"})
        total = sum(p.stat().st_size for p in store.out(digest).iterdir())

        t = time.perf_counter()
        subprocess.run(["cp", "-r", str(store.out(digest)), str(args.dir / "copy")], check=True)
        os.sync()
        cp = time.perf_counter() - t

        server.client().create_bucket(Bucket="kiln-bench")
        tier = RemoteTier(Bucket("s3://kiln-bench/team", server.endpoint))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        tier.push(store, key)
        push = time.perf_counter() - t
        t = time.perf_counter()
        pulled = tier.pull(Store(args.dir / "b"), key)
        pull = time.perf_counter() - t
        assert pulled is not None and pulled[0] == digest
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    finally:
        server.process.terminate()
        server.process.wait(10)
        shutil.rmtree(args.dir, ignore_errors=True)
    mb = total / 1e6
    print(f"entry: {args.files} files, {mb:.0f} MB")
    for name, s in (("cp -r", cp), ("push", push), ("pull", pull)):
        print(f"{name:6s} {s:7.2f} s  {mb / s:7.1f} MB/s")
    print(f"ratio push/cp {push / cp:.1f}x, pull/cp {pull / cp:.1f}x; client peak RSS {peak >> 10} MB "
          f"(base {base >> 10} MB)")


if __name__ == "__main__":
    main()
