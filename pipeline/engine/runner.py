"""Build one planned stage: store hit, or lock → child process → publish → workspace.

The stage runs in a child process (`python -m pipeline.engine.run_stage job.json`)
whose output goes to the console and to the action's log.txt; the parent holds
the key's lock (heartbeat) and publishes. Killing either leaves scratch, no entry.
A stage is settled against the store just before it is checked or run (plan.resolve):
by then its inputs are built and their output digests known.
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
from dataclasses import replace
from pathlib import Path

from pipeline.engine.cost import (
    Cost,
    MemoryLedger,
    TreeSampler,
    describe,
    human_bytes,
    memory_budget,
    tree_bytes,
    wait_rusage,
)
from pipeline.engine.errors import TRANSIENT_EXIT, KilnError, StageFailed, StageFlaked
from pipeline.engine.lock import HOST, FileLock
from pipeline.engine.materialize import materialize
from pipeline.engine.objstore import RemoteUnavailable
from pipeline.engine.plan import StageSpec, resolve, resolved
from pipeline.engine.progress import INTERVAL_ENV, LOG_INTERVAL, TERMINAL_INTERVAL
from pipeline.engine.remote import RemoteCorrupt, RemoteTier
from pipeline.engine.run_stage import RUNNER_PID_ENV
from pipeline.engine.settings import Settings
from pipeline.engine.store import Store, changed_files, remove_tree, stat_signature

ENTRY_MARK = ".kiln-entry.json"


def say(msg: str) -> None:
    print(f"kiln: {msg}", flush=True)


def workspace_mark(spec: StageSpec) -> dict:
    """What the workspace holds: {key, output, entry (the output's dir), log (the run's), files, last}
    as written when it was linked."""
    try:
        return json.loads((spec.workspace / ENTRY_MARK).read_text())
    except (OSError, ValueError):
        return {}


def workspace_intact(spec: StageSpec, mark: dict | None = None) -> bool:
    """The workspace's files are the ones linked from the store: none edited, replaced or removed
    since (compared by size, mtime and inode as recorded when they were linked)."""
    files = (workspace_mark(spec) if mark is None else mark).get("files")
    if files is None:
        return False
    return not changed_files(spec.workspace, files)


def is_up_to_date(spec: StageSpec, specs: list[StageSpec]) -> bool:
    """The doit `uptodate` check: the stage's action key (settled now) has a record, its output is
    as published, and the workspace holds exactly that run's files."""
    spec = resolved(spec, specs)
    if spec.output is None:
        return False
    mark = workspace_mark(spec)
    # the store is lstat'ed too: a store file replaced by a rename keeps the workspace's hard link
    # (the old inode) intact, and stages read the store's path
    return (mark.get("key") == spec.key and mark.get("output") == spec.output and workspace_intact(spec, mark)
            and not Store(spec.store).tampered(spec.output))


def _quarantine_if_tampered(spec: StageSpec, store: Store) -> None:
    """An output whose files changed after publish (a workspace file is a hard link into it) is
    never used: it goes to quarantine and the stage builds again."""
    if spec.output and (changed := store.tampered(spec.output)):
        dest = store.quarantine(spec.output)
        say(f"{spec.task_name}: {', '.join(changed[:5])} changed since the output was published (edited through "
            f"{spec.workspace.name}/?); moved to {dest}, rebuilding")


def waiting_for(owner: dict | None, lock: FileLock) -> str:
    if not owner:
        return (f"waiting: the lock's owner record is unreadable; it counts as stale once its heartbeat is "
                f"{lock.stale_after:.0f} s old")
    return f"waiting for {owner.get('host', '?')}:{owner.get('pid', '?')}, which is building it"


def downstream(stage: str, specs: list[StageSpec]) -> list[StageSpec]:
    """Specs that read `stage`'s output, directly or not (plan order)."""
    reached = {stage}
    out = []
    for s in specs:
        if reached & set(s.input_nodes):
            reached.add(s.stage)
            out.append(s)
    return out


def build(spec: StageSpec, specs: list[StageSpec], settings: Settings) -> str:
    """Make `spec`'s output exist and materialize it; return what happened (built/hit/reused)."""
    spec = resolved(spec, specs)
    if spec.blocked:
        raise StageFailed(f"{spec.task_name}: cannot run here:\n  {spec.blocked}")
    if spec.pending:
        raise StageFailed(f"{spec.task_name}: its input {spec.pending} has no output in the store")
    try:
        return _build(spec, specs, settings)
    except OSError as e:  # a full disk, a read-only or vanished store: say what, not a traceback
        raise StageFailed(f"{spec.task_name}: {e.strerror or e} ({e.filename or spec.store}); nothing was published") from None


def _build(spec: StageSpec, specs: list[StageSpec], settings: Settings) -> str:
    store = Store(spec.store)
    _quarantine_if_tampered(spec, store)
    before = workspace_mark(spec)
    outcome = "hit"
    digest = store.output_of(spec.key)
    if digest is None:
        lock = store.lock(spec.key)
        lock.acquire(on_wait=lambda owner: say(f"{spec.task_name}: {waiting_for(owner, lock)} (key {spec.key[:16]}…)"))
        try:
            digest = store.output_of(spec.key)
            if digest is not None:
                outcome = "reused"
            elif (digest := _pull(spec, store, settings)) is not None:
                outcome = "pulled"
            else:
                digest = _execute(spec, store, settings)
                outcome = "built"
                if not (settings.executor == "ray" and settings.ray_store == "remote"):  # else the node pushed it
                    _push(spec, store, settings)
        finally:
            lock.release()
    store.touch(spec.key, digest)
    last = None
    if outcome == "built" and before.get("key") not in (None, spec.key):
        # early cutoff: stages reading this output keep their keys when its bytes did not change
        after = {s.stage: s for s in resolve(specs)}
        kept = [s for s in downstream(spec.stage, specs) if after[s.stage].output is not None]
        last = {"previous_key": before["key"], "same_output": before.get("output") == digest,
                "kept_downstream": len(kept)}
    # a new output under a digest the workspace already names (the old copy was quarantined by
    # `verify`, or gc'd): the workspace's files are the old copy's, so relink
    _materialize(spec, store, digest, force=outcome != "hit", last=last)
    say(f"{spec.task_name}: {outcome} {spec.key[:16]}… → {settings.shown(spec.workspace)}")
    if last and last["same_output"]:
        n = last["kept_downstream"]
        say(f"{spec.task_name}: same output as before (digest {digest[:16]}…) → {n} downstream "
            f"stage{'s' * (n != 1)} kept")
    return outcome


def _execute(spec: StageSpec, store: Store, settings: Settings) -> str:
    """Run the stage where the executor says (this machine, or a Ray task: the cluster then does
    the resource accounting), trying a run that failed on a known-flaky tool (`ToolFlaked`) again,
    `spec.retries` times at most."""
    for attempt in range(spec.retries + 1):
        try:
            if settings.executor == "ray":
                from pipeline.engine.ray_executor import run_on_ray

                return run_on_ray(spec, store, settings)
            with _resource_slot(spec, settings):
                return run_and_publish(spec, store, settings)
        except StageFlaked as e:
            if attempt == spec.retries:
                raise
            say(f"{spec.task_name}: failed on attempt {attempt + 1} of {spec.retries + 1} "
                f"({str(e).splitlines()[0][:200]}); trying again")
    raise AssertionError("unreachable")


def _pull(spec: StageSpec, store: Store, settings: Settings) -> str | None:
    """The remote tier's entry of the stage's key, published locally; None on a miss (or a remote
    that is optional and unreachable, or an entry found corrupt: the stage then builds)."""
    tier = settings.remote_tier()
    if tier is None or tier.down:
        return None
    try:
        pulled = tier.pull(store, spec.key)
    except RemoteCorrupt as e:
        say(f"{spec.task_name}: {e}; building it (the push that follows replaces nothing: "
            f"`verify --remote` removes the bad entry)")
        return None
    except RemoteUnavailable as e:
        _remote_down(tier, e, settings)
        return None
    if pulled is None:
        return None
    digest, moved = pulled
    say(f"{spec.task_name}: remote hit ← {tier.url} ({moved.describe()})")
    return digest


def _push(spec: StageSpec, store: Store, settings: Settings) -> None:
    tier = settings.remote_tier()
    if tier is None or tier.down:
        return
    try:
        moved = tier.push(store, spec.key)
    except RemoteUnavailable as e:
        _remote_down(tier, e, settings)
        return
    say(f"{spec.task_name}: pushed to {tier.url} ({moved.describe()})")
    for note in moved.notes:
        say(f"{spec.task_name}: {note}")


def _remote_down(tier: RemoteTier, error: RemoteUnavailable, settings: Settings) -> None:
    """A required remote fails the build; an optional one is dropped for the rest of this run."""
    if settings.remote_required:
        raise StageFailed(f"{error} (KILN_REMOTE_REQUIRED=1)")
    tier.down = str(error)
    say(f"warning: {error}; building locally without it for the rest of this run "
        "(KILN_REMOTE_REQUIRED=1 makes this an error)")


def _materialize(spec: StageSpec, store: Store, digest: str, force: bool = False, last: dict | None = None) -> None:
    """Link the output and the run's info/ into the workspace, and mark it ({key, output, files}, and
    what the last rebuild did: `last`, read by `explain`)."""
    ws_lock = FileLock(spec.workspace.parent / ".locks" / f"{spec.stage}.lock")
    with ws_lock:
        mark = workspace_mark(spec)
        if force or mark.get("key") != spec.key or mark.get("output") != digest or not workspace_intact(spec, mark):
            info = store.action(spec.key) / "info"
            materialize([store.out(digest), *([info] if info.is_dir() else [])], spec.workspace,
                        extra={ENTRY_MARK: "{}"})
            files = {p.relative_to(spec.workspace).as_posix(): stat_signature(p)
                     for p in sorted(spec.workspace.rglob("*")) if p.name != ENTRY_MARK and not p.is_dir()}
            new = spec.workspace / ENTRY_MARK
            tmp = new.with_name(f".{ENTRY_MARK}.{os.getpid()}")
            tmp.write_text(json.dumps({"key": spec.key, "output": digest, "entry": str(store.output(digest)),
                                       "log": str(store.action(spec.key) / "log.txt"), "files": files,
                                       **({"last": last} if last else {})}, indent=2))
            os.replace(tmp, new)


@contextmanager
def _resource_slot(spec: StageSpec, settings: Settings) -> Iterator[None]:
    """A stage that declares its peak memory reserves it in the machine's ledger first; a heavy
    stage then takes one of `heavy_slots` machine-wide slots (doit -n N on one host)."""
    if spec.memory:
        ledger = MemoryLedger(settings.artifacts / ".locks", memory_budget(settings.memory_gb))
        if spec.memory > ledger.budget:
            say(f"{spec.task_name}: expects {human_bytes(spec.memory)} of memory, more than the budget "
                f"({human_bytes(ledger.budget)}): it runs alone")
        with ledger.reserved(spec.memory, spec.task_name, lambda msg: say(f"{spec.task_name}: {msg}")):
            with _heavy_slot(spec, settings):
                yield
        return
    with _heavy_slot(spec, settings):
        yield


@contextmanager
def _heavy_slot(spec: StageSpec, settings: Settings) -> Iterator[None]:
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


def run_and_publish(spec: StageSpec, store: Store, settings: Settings, extra_record: dict | None = None) -> str:
    """Run the stage in a child process and publish what it wrote into `store`; return its output
    digest. The caller holds the key's lock; `spec.inputs` names outputs that are in `store`.
    `extra_record`: more for the action record (the Ray node that ran it)."""
    scratch = store.new_scratch(spec.key)
    assert spec.inputs is not None
    job = {
        "stage": spec.name, "entry": spec.entry, "variant": spec.variant, "recipe": spec.recipe, "key": spec.key,
        "params": spec.static["params"], "tools": spec.static["tools"],
        "input_outputs": spec.inputs,
        "inputs": {name: str(store.out(d)) for name, d in spec.inputs.items()},
        "sources": spec.source_paths, "out": str(scratch / "out"), "info": str(scratch / "info"),
        "tmp": str(scratch / "tmp"), "cache": str(store.root / "cache"), "resume": str(store.resume_dir(spec.key)),
    }
    store.resume_dir(spec.key).mkdir(parents=True, exist_ok=True)
    job_file = scratch / "tmp" / "job.json"
    job_file.write_text(json.dumps(job, indent=2))
    log_path = scratch / "log.txt"
    say(f"{spec.task_name}: building key {spec.key[:16]}…")
    start = time.time()
    try:
        rc, tail, cost = _run_child([sys.executable, "-m", "pipeline.engine.run_stage", str(job_file)], log_path, settings,
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
        raise (StageFlaked if rc == TRANSIENT_EXIT else StageFailed)(
            f"{spec.task_name} failed (exit {rc}) after {duration:.1f}s; log: {settings.shown(failed_log)}\n"
            + "".join(f"  | {line}\n" for line in tail)
        )
    cost = replace(cost, output_bytes=tree_bytes(scratch / "out"), scratch_bytes=tree_bytes(scratch / "tmp"))
    record = {
        "stage": spec.stage, "recipe": spec.recipe, "material": spec.material,
        "sources": spec.source_paths, "host": HOST, "pid": os.getpid(),
        "start": start, "duration_s": round(duration, 3), "exit_status": rc, "log": "log.txt",
        "cost": cost.as_dict(), **(extra_record or {}),
    }
    try:
        digest, kept = store.publish(scratch, spec.key, record)
    except KilnError as e:
        remove_tree(scratch)
        raise StageFailed(f"{spec.task_name}: {e}") from None
    remove_tree(store.resume_dir(spec.key))
    shared = "" if kept else " (an identical output was already stored: shared)"
    say(f"{spec.task_name}: done in {duration:.1f}s ({describe(cost.as_dict())}), output {digest[:16]}…{shared} "
        f"(log: {settings.shown(store.action(spec.key) / 'log.txt')})")
    return digest


def _run_child(argv: list[str], log_path: Path, settings: Settings,
               extra_env: dict[str, str]) -> tuple[int, list[str], Cost]:
    """Run argv (never a shell), tee its output to the console and `log_path`; return (rc, last
    lines, what it cost)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(settings.root),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", RUNNER_PID_ENV: str(os.getpid()), **extra_env}
    # progress bars redraw often on a terminal, seldom into a CI log (engine/progress.py)
    env.setdefault(INTERVAL_ENV, str(TERMINAL_INTERVAL if os.isatty(1) else LOG_INTERVAL))
    tail: deque[str] = deque(maxlen=20)
    with open(log_path, "wb", buffering=0) as log:  # unbuffered: `tail -f` follows a running stage
        # its own process group (the stage and the tools it runs): Ctrl-C reaches us only, and we end it
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=settings.root, start_new_session=True)
        assert proc.stdout is not None
        buf = b""
        start = time.monotonic()
        try:
            with TreeSampler(proc.pid) as sampler:
                while chunk := proc.stdout.read1(65536):
                    log.write(chunk.replace(b"\r", b"\n"))  # a progress bar's redraws: one line each in the log
                    os.write(1, chunk)  # fd 1: doit swaps sys.stdout for its own writer
                    buf = (buf + chunk)[-8192:]
                rc, usage = wait_rusage(proc)
            cost = Cost.measured(time.monotonic() - start, usage, sampler.peak)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    for line in buf.decode(errors="replace").replace("\r", "\n").splitlines():
        if line.strip():
            tail.append(line)
    return rc, list(tail), cost
