"""Fault injection on the tiny model's build (a round takes seconds): kill -9 at seeded random
moments, a full disk, a second builder on "another host", a flipped byte, a truncated entry. After
each, the store holds no partial or corrupt entry a build would use, and a final build gives the
same bundle bytes as a clean one."""
from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import time

import pytest
from conftest import wait_for
from test_faults import stage_processes

from pipeline import ROOT
from pipeline.engine.store import Store, differs_from_manifest

pytestmark = pytest.mark.slow
ITERATIONS = int(os.environ.get("KILN_KILL_ITERATIONS", "10"))  # bench/kill_campaign.py runs 200


def sound(store: Store) -> None:
    """Every output is complete and matches its manifest, every action record is complete and names
    an output that is there (or was quarantined); nothing half-published sits in the store."""
    for output in (store.root / "outputs").glob("*/*"):
        assert (output / "manifest.json").is_file(), f"partial output {output}"
        assert differs_from_manifest(output / "out") == [], f"corrupt output {output}"
    for action in (store.root / "actions").glob("*/*"):
        assert (action / "action.json").is_file(), f"partial action record {action}"
        digest = store.record(action.name)["output"]
        assert store.has_output(digest) or (store.root / "quarantine" / digest).is_dir(), f"dangling {action}"


def bundle_bytes(project) -> bytes:
    return (project.artifacts / "tiny" / "bundle" / "tiny.tar.gz").read_bytes()


@pytest.fixture
def clean(tiny_project) -> bytes:
    tiny_project.doit("recipe=tiny")
    return bundle_bytes(tiny_project)


def test_kill_9_at_random_moments(tiny_project, clean):
    rng = random.Random(1415)
    store = Store(tiny_project.store)
    for _ in range(ITERATIONS):
        for key in list(store.actions()):  # make work: drop some entries (the model's too, now and then)
            if rng.random() < 0.6:
                store.forget(key)
        proc = tiny_project.popen_doit("recipe=tiny", stdout=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, 3.5))
        if rng.random() < 0.5:
            os.kill(proc.pid, signal.SIGKILL)  # doit alone: its stage must die with it
        else:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        wait_for(lambda: not stage_processes(str(tiny_project.store)), 10)
        sound(store)
    tiny_project.doit("recipe=tiny")
    sound(store)
    assert bundle_bytes(tiny_project) == clean


def test_a_full_disk_mid_stage_publishes_nothing_and_a_rerun_recovers(tiny_project, clean):
    store = Store(tiny_project.store)
    for key in list(store.actions()):
        store.forget(key)

    def small_disk() -> None:  # writes past 64 KiB fail with EFBIG, as ENOSPC would
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "--dir", str(ROOT), "recipe=tiny"],
                          env=tiny_project.env(), capture_output=True, text=True, preexec_fn=small_disk, timeout=300)
    assert proc.returncode != 0 and "Traceback (most recent call last)" not in proc.stderr.split("kiln:")[0]
    assert "tiny:model failed" in proc.stdout + proc.stderr
    assert list(store.actions()) == [] and list((tiny_project.store / "locks").glob("*.lock")) == []
    sound(store)
    tiny_project.doit("recipe=tiny")
    assert bundle_bytes(tiny_project) == clean


def test_a_builder_on_another_host_takes_over_a_dead_lock_after_the_heartbeat_window(tiny_project, clean):
    store = Store(tiny_project.store)
    for key in list(store.actions()):
        store.forget(key)
    first = tiny_project.popen_doit("recipe=tiny", stdout=subprocess.DEVNULL)
    wait_for(lambda: stage_processes(str(tiny_project.store)), 60)
    os.killpg(first.pid, signal.SIGKILL)  # host "a" crashes holding the model's lock
    first.wait()
    lock = next((tiny_project.store / "locks").glob("*.lock"))
    t0 = time.monotonic()
    second = tiny_project.doit("recipe=tiny", KILN_HOST_ID="b", KILN_LOCK_STALE_AFTER="3")
    assert "waiting for" in second.stdout and "tiny:bundle: built" in second.stdout
    assert time.monotonic() - t0 >= 3 and not lock.exists()
    sound(store)
    assert bundle_bytes(tiny_project) == clean


@pytest.mark.parametrize("fault", ["flip", "truncate"])
def test_a_damaged_entry_is_never_used(tiny_project, clean, fault):
    store = Store(tiny_project.store)
    weights = next(tiny_project.store.glob("outputs/*/*/out/model.safetensors"))
    weights.chmod(0o644)
    if fault == "flip":
        st = weights.stat()
        with open(weights, "r+b") as f:
            f.seek(st.st_size // 2)
            byte = f.read(1)
            f.seek(st.st_size // 2)
            f.write(bytes([byte[0] ^ 0xFF]))
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # hide it from the stat signature
        for key in list(store.actions()):
            if store.record(key)["stage"] == "bundle":
                store.forget(key)  # the bundle must be packed again, from the damaged entry
        proc = tiny_project.doit("recipe=tiny", check=False)
        assert proc.returncode != 0 and "bundle: model's entry does not match its manifest" in proc.stdout
        verify = tiny_project.doit("recipe=tiny", "verify", check=False)
        assert verify.returncode != 0 and "MISMATCH in model.safetensors" in verify.stdout
    else:
        os.truncate(weights, 100)
    tiny_project.doit("recipe=tiny")
    sound(store)
    assert bundle_bytes(tiny_project) == clean
