"""What a stage run cost, and a machine-wide memory budget for the stages that declare their peak.

Cost (kept in the action record under `cost`; never part of a key or an output):
- wall_s: the child's wall time;
- cpu_s: user + system time of the child and every tool it waited for (`wait4`'s rusage: exact);
- peak_rss_bytes: the largest sum of RSS over the stage's process tree, sampled every 0.2 s (a
  process shorter than that may be missed). Not rusage's ru_maxrss: Linux carries a process's
  high-water mark across fork and exec, so every child would report at least the runner's own
  peak (the runner hashes multi-GB outputs);
- output_bytes: what was published; scratch_bytes: what the stage left in its scratch `tmp/`.

Memory budget: `doit -n 2` may start two heavy stages that do not fit together. A stage that
declares its expected peak (`Stage.peak_memory`) reserves it in a ledger shared by the Kiln
processes of one workspace on this host (one JSON file under the workspace's locks, entries of
dead processes dropped) and waits while the reservations would exceed the budget
(`KILN_MEMORY_GB` or pyproject `memory_gb`, default 90% of physical memory). A stage larger than
the budget runs alone among the stages that declare their peak.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.engine.lock import HOST, FileLock, pid_alive

SAMPLE_S = 0.2
GB = 1 << 30


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", GB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


class TreeSampler:
    """Peak of the summed RSS of a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeSampler:
        import psutil  # here, not at module level (every doit start would pay for it), nor in the thread

        self._psutil = psutil
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        psutil = self._psutil
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:  # exited between the listing and the read
                        pass
            except psutil.Error:
                return
            self.peak = max(self.peak, total)
            self._stop.wait(SAMPLE_S)


def wait_rusage(proc: subprocess.Popen) -> tuple[int, resource.struct_rusage]:
    """Wait for `proc` and return (its exit code, the rusage of it and the children it waited for)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage


@dataclass(frozen=True)
class Cost:
    wall_s: float
    cpu_s: float
    peak_rss_bytes: int
    output_bytes: int = 0
    scratch_bytes: int = 0

    @classmethod
    def measured(cls, wall_s: float, usage: resource.struct_rusage, tree_peak: int) -> Cost:
        return cls(round(wall_s, 3), round(usage.ru_utime + usage.ru_stime, 3), tree_peak)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def own_peak_rss() -> int:
    """This process's peak RSS so far (VmHWM: per address space, so exact after exec, unlike
    rusage), for a stage to log which of its phases is the expensive one; 0 off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def return_free_memory() -> None:
    """Free what only reference cycles still hold (a torch module with hooks that close over their
    owner is one: without a collection it outlives its last name until the collector runs), then
    hand the allocator's free pages back to the system (glibc's malloc_trim): after a phase that
    peaked, the heap keeps what it freed (tensors under glibc's mmap threshold, which grows to 32 MB
    once large blocks are freed), and the next phase's peak lands on top of it."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.is_dir() else 0


def describe(cost: dict[str, Any] | None) -> str:
    """'162 s wall, 310 s CPU, peak RSS 19.5 GiB, wrote 5.6 GiB' (or '' when not measured)."""
    if not cost:
        return ""
    return (f"{cost['wall_s']:.0f} s wall, {cost['cpu_s']:.0f} s CPU, peak RSS {human_bytes(cost['peak_rss_bytes'])}, "
            f"wrote {human_bytes(cost.get('output_bytes', 0))}")


def memory_budget(setting: float | None) -> int:
    if setting:
        return int(setting * GB)
    return int(0.9 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


class MemoryLedger:
    """Reservations of expected peak memory by the Kiln processes of this machine."""

    def __init__(self, directory: Path, budget: int) -> None:
        self.file = directory / "memory.json"
        self.lock = FileLock(directory / "memory.lock")
        self.budget = budget

    def _live(self) -> list[dict[str, Any]]:
        try:
            entries = json.loads(self.file.read_text())
        except (OSError, ValueError):
            return []
        if not isinstance(entries, list):
            return []
        return [e for e in entries if isinstance(e, dict) and e.get("host") == HOST and type(e.get("pid")) is int
                and e["pid"] > 0 and type(e.get("bytes")) is int and e["bytes"] >= 0 and isinstance(e.get("id"), str)
                and pid_alive(e["pid"])]

    def _write(self, entries: list[dict[str, Any]]) -> None:
        tmp = self.file.with_name(f".memory.{os.getpid()}.json")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, self.file)

    def try_reserve(self, need: int, task: str) -> str | None:
        """Reserve `need` bytes when they fit beside the live reservations (or nothing else is
        reserved); return the reservation's id, or None."""
        with self.lock:
            entries = self._live()
            if entries and sum(e["bytes"] for e in entries) + need > self.budget:
                return None
            ident = uuid.uuid4().hex
            self._write([*entries, {"id": ident, "host": HOST, "pid": os.getpid(), "bytes": need, "task": task}])
            return ident

    def release(self, ident: str) -> None:
        with self.lock:
            self._write([e for e in self._live() if e["id"] != ident])

    def holders(self) -> list[str]:
        return [f"{e['task']} ({human_bytes(e['bytes'])})" for e in self._live()]

    @contextmanager
    def reserved(self, need: int, task: str, on_wait: Callable[[str], None]) -> Iterator[None]:
        told = False
        while (ident := self.try_reserve(need, task)) is None:
            if not told:
                on_wait(f"expects {human_bytes(need)} of memory; waiting for {', '.join(self.holders())} "
                        f"(budget {human_bytes(self.budget)})")
                told = True
            time.sleep(0.5)
        try:
            yield
        finally:
            self.release(ident)
