"""Helpers for the benchmarks: big payload files, page-cache eviction, timing."""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

GB = 1_000_000_000


def make_payload(directory: Path, total_bytes: int, files: int) -> list[Path]:
    """`files` files of random-looking bytes adding up to `total_bytes` (reused if present)."""
    directory.mkdir(parents=True, exist_ok=True)
    block = os.urandom(1 << 26)
    per_file = total_bytes // files
    paths = []
    for i in range(files):
        path = directory / f"part-{i:03d}.bin"
        if not path.is_file() or path.stat().st_size != per_file:
            with open(path, "wb") as f:
                left = per_file
                while left:
                    n = min(left, len(block))
                    f.write(block[:n])
                    left -= n
        paths.append(path)
    return paths


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache (no root needed), for cold reads."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_of(n: int, fn: Callable[[], object], before: Callable[[], object] = lambda: None) -> float:
    samples = []
    for _ in range(n):
        before()
        samples.append(timed(fn))
    return statistics.median(samples)


def bench_env(base: Path) -> dict[str, str]:
    """Environment for a Kiln project living under `base` (real recipes, own workspace and store)."""
    from pipeline import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update(KILN_RECIPES=str(ROOT / "recipes"), KILN_ARTIFACTS=str(base / "artifacts"),
               KILN_STORE=str(base / "store"))
    return env


def populate_store(base: Path, recipe: str, gb_per_stage: float, files_per_stage: int = 5) -> list:
    """Publish a payload under each planned key of `recipe` and materialize it, as a build would.

    The payloads are synthetic (a no-op never reads outputs, so only their
    size matters here); publishing and materializing use Kiln's real code.
    """
    from pipeline.engine.plan import plan, resolved
    from pipeline.engine.runner import build
    from pipeline.engine.settings import Settings
    from pipeline.engine.store import Store
    from pipeline.registry import load_recipe

    os.environ.update(bench_env(base))
    settings = Settings.from_env()
    specs = plan(load_recipe(recipe, settings))
    for spec in specs:
        spec = resolved(spec, specs)  # its inputs are published by now: its key is settled
        store = Store(spec.store)
        if store.output_of(spec.key) is None:
            payload = make_payload(base / "payload" / spec.stage, int(gb_per_stage * GB), files_per_stage)
            scratch = store.new_scratch(spec.key)
            for f in payload:
                os.link(f, scratch / "out" / f.name)
            store.publish(scratch, spec.key, {"stage": spec.stage, "material": spec.material, "synthetic": True})
        build(spec, specs, settings)  # a store hit: materializes the workspace
    return plan(load_recipe(recipe, settings))
