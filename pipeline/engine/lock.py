"""A lock file that works across processes and across hosts sharing a directory.

`fcntl`/`flock` locks are unreliable on NFS, so the lock is the existence of a
file. It is written whole under a temporary name, then `link(2)`ed into place
(atomic on NFS too, and unlike `rename` it fails when a lock is there), so a lock
file is never seen half-written — not even after a full disk. It holds the owner
(host, pid, token); a heartbeat thread bumps its mtime. A waiter takes over a lock
whose owner is a dead process on this host, or whose heartbeat is older than
`stale_after` seconds (another host that crashed), by renaming it aside —
rename is atomic, so only one waiter wins the takeover.
"""
from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

# Who holds a lock. KILN_HOST_ID stands in for the host name where one machine plays several
# (tests, containers sharing a hostname); KILN_LOCK_STALE_AFTER shortens the heartbeat window.
HOST = re.sub(r"[^A-Za-z0-9._-]", "-", os.environ.get("KILN_HOST_ID") or socket.gethostname())[:64]
STALE_AFTER = float(os.environ.get("KILN_LOCK_STALE_AFTER") or 60.0)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FileLock:
    def __init__(self, path: Path, heartbeat: float | None = None, stale_after: float | None = None):
        self.path = path
        self.stale_after = STALE_AFTER if stale_after is None else stale_after
        self.heartbeat = min(5.0, self.stale_after / 4) if heartbeat is None else heartbeat
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"host": HOST, "pid": os.getpid(), "token": self.token, "since": time.time()})
        tmp = self.path.with_name(f".{self.path.name}.{self.token}.tmp")
        try:
            with open(tmp, "x") as f:  # a full disk fails here, before any lock file exists
                f.write(record)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat:{self.path.name}")
        self._thread.start()
        return True

    def try_acquire_or_take_over(self) -> bool:
        """One non-blocking attempt that also clears a stale lock first."""
        return self.try_acquire() or (self._take_over_if_stale() and self.try_acquire())

    def acquire(self, on_wait: Callable[[dict | None], None] | None = None, poll: float = 0.2) -> None:
        told = False
        while not self.try_acquire_or_take_over():
            if on_wait and not told:
                on_wait(self.owner())
                told = True
            time.sleep(poll)

    def is_stale(self) -> bool:
        return self._stale_owner() is not None

    def _stale_owner(self) -> dict | None:
        """The owner record of the current lock file if that lock is stale."""
        owner = self.owner()
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        if owner and owner.get("host") == HOST and isinstance(owner.get("pid"), int):
            dead = not pid_alive(owner["pid"]) or age > self.stale_after
        else:
            # Unreadable (being written) or another host's: only the heartbeat tells.
            dead = age > self.stale_after
        return (owner or {}) if dead else None

    def _take_over_if_stale(self) -> bool:
        stale = self._stale_owner()
        if stale is None:
            return False
        aside = self.path.with_name(f"{self.path.name}.stale.{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # someone else removed it; retry at once
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = {}
        if stale.get("token") and moved.get("token") != stale.get("token"):
            # Another waiter took over between our check and our rename: put
            # its fresh lock back (link fails if the path is taken again).
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        owner = self.owner()
        if owner and owner.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
