"""Faults a builder meets: a full disk while locking, an unreadable lock, a killed or interrupted
`doit`. After each, no half-written lock or entry, no orphaned stage process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import wait_for

from pipeline.engine.lock import FileLock
from pipeline.engine.runner import waiting_for
from pipeline.engine.store import Store


def stage_processes(marker: str) -> list[int]:
    """Pids of live processes whose command line mentions `marker`."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (proc / "stat").read_text().split(")")[-1].split()[0]
            except OSError:
                continue
            if marker in cmdline and state != "Z":
                found.append(int(proc.name))
    return found




def test_a_full_disk_leaves_no_lock_file(tmp_path):
    """RLIMIT_FSIZE makes the write fail as ENOSPC would: no lock file, empty or not, appears."""
    lock = tmp_path / "locks" / "k.lock"
    code = ("import resource, signal, sys; from pathlib import Path; from pipeline.engine.lock import FileLock\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (8, 8))\n"
            f"try: FileLock(Path({str(lock)!r})).try_acquire()\n"
            "except OSError as e: print('refused:', e.strerror); sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert proc.returncode == 3 and "refused: File too large" in proc.stdout, proc.stdout + proc.stderr
    assert list((tmp_path / "locks").iterdir()) == []  # neither the lock nor its temporary file
    assert FileLock(lock).try_acquire()  # and the next builder gets it at once


def test_an_unreadable_lock_is_stale_after_the_heartbeat_window_and_the_wait_says_so(tmp_path):
    path = tmp_path / "k.lock"
    path.write_text("")  # what a crash in the old O_EXCL-then-write scheme could leave
    lock = FileLock(path, stale_after=1.0)
    assert not lock.try_acquire_or_take_over()  # fresh: it may be a live owner writing
    assert "owner record is unreadable; it counts as stale once its heartbeat is 1 s old" in waiting_for(lock.owner(), lock)
    old = time.time() - 5
    os.utime(path, (old, old))
    assert lock.try_acquire_or_take_over() and lock.owner()["pid"] == os.getpid()
    lock.release()


def start_model_build(tiny_project) -> tuple[subprocess.Popen, Store]:
    proc = tiny_project.popen_doit("recipe=tiny")
    wait_for(lambda: stage_processes(str(tiny_project.store)), 60)
    time.sleep(1.0)  # inside the stage (imports, then the checkpoint)
    return proc, Store(tiny_project.store)


def test_kill_9_of_doit_takes_the_stage_process_with_it(tiny_project):
    proc, store = start_model_build(tiny_project)
    assert stage_processes(str(tiny_project.store))  # still converting the checkpoint (seconds to go)
    os.kill(proc.pid, signal.SIGKILL)  # doit only, not its process group
    proc.wait()
    wait_for(lambda: not stage_processes(str(tiny_project.store)), 1.5)  # not when it would have finished
    assert list(store.actions()) == []
    out = tiny_project.doit("recipe=tiny").stdout  # the next builder takes over the dead lock at once
    assert "tiny:bundle: built" in out


@pytest.mark.parametrize("sig, rc, how", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_or_term_is_one_line_lock_released_nothing_published(tiny_project, sig, rc, how):
    """Ctrl-C (SIGINT from the terminal; the stage has its own group) or a `kill` / CI timeout (SIGTERM)."""
    proc, store = start_model_build(tiny_project)
    os.kill(proc.pid, sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == rc, out
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if how in line]
    assert lines == [f"kiln: {how} tiny:model: nothing of it was published, its lock is released; "
                     "run the same command again to resume"]
    wait_for(lambda: not stage_processes(str(tiny_project.store)), 10)
    assert list(store.actions()) == [] and list((tiny_project.store / "locks").glob("*.lock")) == []
    assert not any((tiny_project.store / "scratch").iterdir())
