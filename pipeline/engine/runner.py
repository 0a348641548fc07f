"""Build one planned stage: store hit, or lock → child process → publish → workspace.

The stage runs in a child process (`python -m pipeline.engine.run_stage job.json`)
whose output goes to the console and to the entry's log.txt; the parent holds
the key's lock (heartbeat) and publishes. Killing either leaves scratch, no entry.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.engine.errors import KilnError, StageFailed
from pipeline.engine.lock import HOST, FileLock
from pipeline.engine.materialize import materialize
from pipeline.engine.plan import StageSpec
from pipeline.engine.progress import INTERVAL_ENV, LOG_INTERVAL, TERMINAL_INTERVAL
from pipeline.engine.run_stage import RUNNER_PID_ENV
from pipeline.engine.settings import Settings
from pipeline.engine.store import Store, remove_tree, stat_signature

ENTRY_MARK = ".kiln-entry.json"


def say(msg: str) -> None:
    print(f"kiln: {msg}", flush=True)


def _mark(spec: StageSpec) -> dict:
    try:
        return json.loads((spec.workspace / ENTRY_MARK).read_text())
    except (OSError, ValueError):
        return {}


def workspace_key(spec: StageSpec) -> str | None:
    return _mark(spec).get("key")


def workspace_intact(spec: StageSpec, mark: dict | None = None) -> bool:
    """The workspace's files are the ones linked from the entry: none edited, replaced or removed
    since (compared by size, mtime and inode as recorded when they were linked)."""
    files = (_mark(spec) if mark is None else mark).get("files")
    if files is None:
        return False
    try:
        return all(stat_signature(spec.workspace / rel) == sig for rel, sig in files.items())
    except OSError:
        return False


def is_up_to_date(spec: StageSpec) -> bool:
    """The doit `uptodate` check: the key's entry exists and is as published, and the workspace
    holds exactly its files."""
    store, mark = Store(spec.store), _mark(spec)
    return (mark.get("key") == spec.key and store.has(spec.key) and not store.tampered(spec.key)
            and workspace_intact(spec, mark))


def _quarantine_if_tampered(spec: StageSpec, store: Store) -> None:
    """An entry whose files changed after publish (a workspace file is a hard link into it) is
    never used: it goes to quarantine and the stage builds again."""
    if store.has(spec.key) and (changed := store.tampered(spec.key)):
        dest = store.quarantine(spec.key)
        say(f"{spec.task_name}: {', '.join(changed[:5])} changed since the entry was published (edited through "
            f"{spec.workspace.name}/?); entry moved to {dest}, rebuilding")


def waiting_for(owner: dict | None, lock: FileLock) -> str:
    if not owner:
        return (f"waiting: the lock's owner record is unreadable; it counts as stale once its heartbeat is "
                f"{lock.stale_after:.0f} s old")
    return f"waiting for {owner.get('host', '?')}:{owner.get('pid', '?')}, which is building it"


def build(spec: StageSpec, settings: Settings) -> str:
    """Make `spec`'s entry exist and materialize it; return what happened (built/hit/reused)."""
    if spec.blocked:
        raise StageFailed(f"{spec.task_name}: cannot run here:\n  {spec.blocked}")
    try:
        return _build(spec, settings)
    except OSError as e:  # a full disk, a read-only or vanished store: say what, not a traceback
        raise StageFailed(f"{spec.task_name}: {e.strerror or e} ({e.filename or spec.store}); nothing was published") from None


def _build(spec: StageSpec, settings: Settings) -> str:
    store = Store(spec.store)
    outcome = "hit"
    _quarantine_if_tampered(spec, store)
    if not store.has(spec.key):
        lock = store.lock(spec.key)
        lock.acquire(on_wait=lambda owner: say(f"{spec.task_name}: {waiting_for(owner, lock)} (key {spec.key[:16]}…)"))
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
    ws_lock = FileLock(spec.workspace.parent / ".locks" / f"{spec.stage}.lock")
    with ws_lock:
        if force or workspace_key(spec) != spec.key or not workspace_intact(spec):
            materialize(store.out(spec.key), spec.workspace, extra={ENTRY_MARK: "{}"})
            files = {p.relative_to(spec.workspace).as_posix(): stat_signature(p)
                     for p in sorted(spec.workspace.rglob("*")) if p.name != ENTRY_MARK and not p.is_dir()}
            mark = spec.workspace / ENTRY_MARK
            tmp = mark.with_name(f".{ENTRY_MARK}.{os.getpid()}")
            tmp.write_text(json.dumps({"key": spec.key, "entry": str(store.entry(spec.key)), "files": files}, indent=2))
            os.replace(tmp, mark)


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
    try:
        rc, tail = _run_child([sys.executable, "-m", "pipeline.engine.run_stage", str(job_file)], log_path, settings,
                              {"TMPDIR": str(scratch / "tmp")})  # tools' temporary files stay in the scratch, too
    except KeyboardInterrupt:
        remove_tree(scratch)
        raise
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
        "sources": spec.source_paths, "host": HOST, "pid": os.getpid(),
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
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", RUNNER_PID_ENV: str(os.getpid()), **extra_env}
    # progress bars redraw often on a terminal, seldom into a CI log (engine/progress.py)
    env.setdefault(INTERVAL_ENV, str(TERMINAL_INTERVAL if os.isatty(1) else LOG_INTERVAL))
    tail: deque[str] = deque(maxlen=20)
    with open(log_path, "wb") as log:
        # its own process group (the stage and the tools it runs): Ctrl-C reaches us only, and we end it
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=settings.root, start_new_session=True)
        assert proc.stdout is not None
        buf = b""
        try:
            while chunk := proc.stdout.read1(65536):
                log.write(chunk.replace(b"\r", b"\n"))  # a progress bar's redraws: one line each in the log
                os.write(1, chunk)  # fd 1: doit swaps sys.stdout for its own writer
                buf = (buf + chunk)[-8192:]
            rc = proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    for line in buf.decode(errors="replace").replace("\r", "\n").splitlines():
        if line.strip():
            tail.append(line)
    return rc, list(tail)
