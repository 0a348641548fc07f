"""Build one planned stage: store hit, or lock → child process → publish → workspace.

The stage runs in a child process (`python -m pipeline.engine.run_stage job.json`)
whose output goes to the console and to the entry's log.txt; the parent holds
the key's lock (heartbeat) and publishes. Killing either leaves scratch, no entry.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.engine.errors import KilnError, StageFailed
from pipeline.engine.lock import FileLock
from pipeline.engine.materialize import materialize
from pipeline.engine.plan import StageSpec
from pipeline.engine.progress import INTERVAL_ENV, LOG_INTERVAL, TERMINAL_INTERVAL
from pipeline.engine.settings import Settings
from pipeline.engine.store import Store, remove_tree

ENTRY_MARK = ".kiln-entry.json"


def say(msg: str) -> None:
    print(f"kiln: {msg}", flush=True)


def workspace_key(spec: StageSpec) -> str | None:
    try:
        return json.loads((spec.workspace / ENTRY_MARK).read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


def is_up_to_date(spec: StageSpec) -> bool:
    """The doit `uptodate` check: the key's entry exists and the workspace points at it."""
    return workspace_key(spec) == spec.key and Store(spec.store).has(spec.key)


def build(spec: StageSpec, settings: Settings) -> str:
    """Make `spec`'s entry exist and materialize it; return what happened (built/hit/reused)."""
    if spec.blocked:
        raise StageFailed(f"{spec.task_name}: cannot run here:\n  {spec.blocked}")
    store = Store(spec.store)
    outcome = "hit"
    if not store.has(spec.key):
        lock = store.lock(spec.key)
        lock.acquire(on_wait=lambda o: say(
            f"{spec.task_name}: waiting for {(o or {}).get('host', '?')}:{(o or {}).get('pid', '?')}, "
            f"which is building key {spec.key[:16]}…"))
        try:
            if store.has(spec.key):
                outcome = "reused"
            else:
                with _resource_slot(spec, settings):
                    _run_and_publish(spec, store, settings)
                outcome = "built"
        finally:
            lock.release()
    store.touch(spec.key)
    # a new entry under a key the workspace already names (its old entry was quarantined by
    # `verify`, or gc'd): the workspace's files are the old entry's, so relink
    _materialize(spec, store, force=outcome != "hit")
    say(f"{spec.task_name}: {outcome} {spec.key[:16]}… → {settings.shown(spec.workspace)}")
    return outcome


def _materialize(spec: StageSpec, store: Store, force: bool = False) -> None:
    mark = json.dumps({"key": spec.key, "entry": str(store.entry(spec.key))}, indent=2)
    ws_lock = FileLock(spec.workspace.parent / ".locks" / f"{spec.stage}.lock")
    with ws_lock:
        if force or workspace_key(spec) != spec.key:
            materialize(store.out(spec.key), spec.workspace, extra={ENTRY_MARK: mark})


@contextmanager
def _resource_slot(spec: StageSpec, settings: Settings) -> Iterator[None]:
    """Heavy stages take one of `heavy_slots` machine-wide slots (doit -n N on one host)."""
    if spec.resource != "heavy":
        yield
        return
    slots = [FileLock(settings.artifacts / ".locks" / f"heavy.{i}.lock") for i in range(max(1, settings.heavy_slots))]
    told = False
    while True:
        for slot in slots:
            if slot.try_acquire_or_take_over():
                try:
                    yield
                finally:
                    slot.release()
                return
        if not told:
            say(f"{spec.task_name}: waiting for a heavy-stage slot ({len(slots)} on this machine)")
            told = True
        time.sleep(0.5)


def _run_and_publish(spec: StageSpec, store: Store, settings: Settings) -> None:
    scratch = store.new_scratch(spec.key)
    job = {
        "stage": spec.name, "entry": spec.entry, "variant": spec.variant, "recipe": spec.recipe, "key": spec.key,
        "params": spec.material["params"], "tools": spec.material["tools"],
        "input_keys": spec.inputs,
        "input_tools": {name: store.meta(k)["material"]["tools"] for name, k in spec.inputs.items()},
        "inputs": {name: str(store.out(k)) for name, k in spec.inputs.items()},
        "sources": spec.source_paths, "out": str(scratch / "out"), "tmp": str(scratch / "tmp"), "cache": str(store.root
        / "cache"),
    }
    job_file = scratch / "tmp" / "job.json"
    job_file.write_text(json.dumps(job, indent=2))
    log_path = scratch / "log.txt"
    say(f"{spec.task_name}: building key {spec.key[:16]}…")
    start = time.time()
    rc, tail = _run_child([sys.executable, "-m", "pipeline.engine.run_stage", str(job_file)], log_path, settings,
                          {"TMPDIR": str(scratch / "tmp")})  # tools' temporary files stay in the scratch, too
    duration = time.time() - start
    if rc != 0:
        failed_log = spec.workspace.parent / "logs" / f"{spec.stage}.failed.log"
        failed_log.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log_path, failed_log)
        remove_tree(scratch)
        raise StageFailed(
            f"{spec.task_name} failed (exit {rc}) after {duration:.1f}s; log: {settings.shown(failed_log)}\n"
            + "".join(f"  | {line}\n" for line in tail)
        )
    meta = {
        "stage": spec.stage, "recipe": spec.recipe, "material": spec.material,
        "sources": spec.source_paths, "host": socket.gethostname(), "pid": os.getpid(),
        "start": start, "duration_s": round(duration, 3), "exit_status": rc, "log": "log.txt",
    }
    try:
        published = store.publish(scratch, spec.key, meta)
    except KilnError as e:
        remove_tree(scratch)
        raise StageFailed(f"{spec.task_name}: {e}") from None
    if published:
        say(f"{spec.task_name}: done in {duration:.1f}s (log: {settings.shown(store.entry(spec.key) / 'log.txt')})")
    else:
        say(f"{spec.task_name}: another process published {spec.key[:16]}… first; using it")


def _run_child(argv: list[str], log_path: Path, settings: Settings, extra_env: dict[str, str]) -> tuple[int, list[str]]:
    """Run argv (never a shell), tee its output to the console and `log_path`; return (rc, last lines)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(settings.root),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra_env}
    # progress bars redraw often on a terminal, seldom into a CI log (engine/progress.py)
    env.setdefault(INTERVAL_ENV, str(TERMINAL_INTERVAL if os.isatty(1) else LOG_INTERVAL))
    tail: deque[str] = deque(maxlen=20)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=settings.root)
        assert proc.stdout is not None
        buf = b""
        while chunk := proc.stdout.read1(65536):
            log.write(chunk.replace(b"\r", b"\n"))  # a progress bar's redraws: one line each in the log
            os.write(1, chunk)  # fd 1: doit swaps sys.stdout for its own writer
            buf = (buf + chunk)[-8192:]
        rc = proc.wait()
    for line in buf.decode(errors="replace").replace("\r", "\n").splitlines():
        if line.strip():
            tail.append(line)
    return rc, list(tail)
