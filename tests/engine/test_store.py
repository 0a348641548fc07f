"""Store: outputs by digest, action records written last, dedup, atomic publish, read-only
entries, locks across processes, materialize, gc, verify."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import ROOT
from pipeline.cli.gc import gc
from pipeline.cli.verify import verify
from pipeline.engine.errors import KilnError
from pipeline.engine.keys import output_digest
from pipeline.engine.lock import FileLock
from pipeline.engine.materialize import materialize
from pipeline.engine.store import Store, file_manifest

KEY = "ab" * 32


def publish_one(store: Store, key: str = KEY, payload: bytes = b"hello") -> str:
    scratch = store.new_scratch(key)
    (scratch / "out" / "sub").mkdir()
    (scratch / "out" / "sub" / "f.bin").write_bytes(payload)
    (scratch / "info" / "timings.json").write_text('{"s": 1}')
    digest, _kept = store.publish(scratch, key, {"stage": "t", "material": {}})
    return digest


def test_publish_is_atomic_and_read_only(tmp_path):
    store = Store(tmp_path)
    digest = publish_one(store)
    assert store.output_of(KEY) == digest and not list((tmp_path / "scratch").iterdir())
    f = store.out(digest) / "sub" / "f.bin"
    assert stat.S_IMODE(f.stat().st_mode) == 0o444
    assert stat.S_IMODE(store.output(digest).stat().st_mode) == 0o555 and stat.S_IMODE(f.parent.stat().st_mode) == 0o555
    manifest = store.manifest(digest)
    assert manifest["files"]["sub/f.bin"]["size"] == 5 and manifest["digest"] == digest
    assert digest == output_digest(file_manifest(store.out(digest)))  # the digest is the manifest's
    record = store.record(KEY)
    assert record["key"] == KEY and record["output"] == digest
    # measurements stay with the action, outside the output and its digest
    assert (store.action(KEY) / "info" / "timings.json").is_file() and not (store.out(digest) / "timings.json").exists()


def test_two_action_keys_with_the_same_output_share_one_copy(tmp_path):
    store = Store(tmp_path)
    first = publish_one(store, KEY)
    second = publish_one(store, "cd" * 32)  # another action, byte-identical output
    assert first == second and list(store.outputs()) == [first]
    assert sorted(store.actions()) == sorted([KEY, "cd" * 32])
    assert store.output_of("cd" * 32) == first
    different = publish_one(store, "ef" * 32, b"other")
    assert different != first and len(list(store.outputs())) == 2


def test_second_publish_of_same_key_is_discarded(tmp_path):
    store = Store(tmp_path)
    digest = publish_one(store)
    scratch = store.new_scratch(KEY)
    (scratch / "out" / "other").write_text("x")
    store.publish(scratch, KEY, {})
    assert not scratch.exists() and store.output_of(KEY) == digest  # the first record stands
    assert (store.out(digest) / "sub" / "f.bin").read_bytes() == b"hello"


def test_a_record_never_names_a_missing_output(tmp_path):
    """The action record is published after its output; a record whose output went (quarantine,
    gc) is a miss, never a half entry."""
    store = Store(tmp_path)
    digest = publish_one(store)
    store.quarantine(digest)
    assert store.record(KEY) is not None and store.output_of(KEY) is None
    rebuilt = publish_one(store, KEY, b"rebuilt")  # the next build of that key replaces the record
    assert store.output_of(KEY) == rebuilt != digest


WRITER = """
import sys, time
from pathlib import Path
from pipeline.engine.errors import KilnError
from pipeline.engine.store import Store
store = Store(Path(sys.argv[1]))
scratch = store.new_scratch(sys.argv[2])
with open(scratch / "out" / "big.bin", "wb") as f:
    print("writing", flush=True)
    while True:
        f.write(b"x" * 65536); time.sleep(0.001)
"""


def test_writer_killed_by_sigkill_leaves_no_entry(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), KEY], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    store = Store(tmp_path)
    assert store.output_of(KEY) is None and list(store.outputs()) == [] and list(store.actions()) == []
    leftovers = list((tmp_path / "scratch").iterdir())
    assert len(leftovers) == 1
    assert store.stale_scratch(min_age=0) == leftovers  # no live lock: gc may remove it


RACER = """
import sys
from pathlib import Path
from pipeline.engine.store import Store
store = Store(Path(sys.argv[1]))
for i in range(int(sys.argv[3])):
    key = sys.argv[2] + format(i, "02x") * 31
    scratch = store.new_scratch(key)
    (scratch / "out" / "w.bin").write_bytes(b"same bytes" * 1000)
    store.publish(scratch, key, {"stage": "t", "material": {}})
"""


def test_publishers_racing_on_one_output_digest_leave_one_copy_and_every_record(tmp_path):
    """Two processes publish the same bytes under the same and under different action keys at the
    same time: one output, every record naming it, no scratch left."""
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), prefix, "40"], cwd=ROOT)
             for prefix in ("aa", "aa", "bb")]
    assert [p.wait(120) for p in procs] == [0, 0, 0]
    store = Store(tmp_path)
    (digest,) = store.outputs()
    assert len(list(store.actions())) == 80 and all(store.output_of(k) == digest for k in store.actions())
    assert not list((tmp_path / "scratch").iterdir()) and verify(tmp_path)[1] == []


def _contend(lock_path: str, counter: str, rounds: int) -> None:
    for _ in range(rounds):
        lock = FileLock(Path(lock_path), heartbeat=0.05)
        lock.acquire(poll=0.001)
        try:
            value = int(Path(counter).read_text())
            time.sleep(0.001)  # widen the race window
            Path(counter).write_text(str(value + 1))
        finally:
            lock.release()


def test_lock_excludes_across_processes(tmp_path):
    counter = tmp_path / "n"
    counter.write_text("0")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_contend, args=(str(tmp_path / "k.lock"), str(counter), 40)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert counter.read_text() == "120"


def test_dead_owner_lock_is_taken_over(tmp_path):
    path = tmp_path / "k.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": int(dead.stdout), "token": "t"}))
    lock = FileLock(path)
    t0 = time.time()
    lock.acquire()
    assert time.time() - t0 < 2 and lock.owner()["pid"] == os.getpid()
    lock.release()
    assert not path.exists()


def test_other_host_lock_waits_for_heartbeat_then_takes_over(tmp_path):
    path = tmp_path / "k.lock"
    path.write_text(json.dumps({"host": "other-host", "pid": 1, "token": "t"}))
    lock = FileLock(path, stale_after=0.5)
    assert not lock.try_acquire() and not lock.is_stale()
    old = time.time() - 5
    os.utime(path, (old, old))  # the other host stopped beating 5 s ago
    lock.acquire()
    assert lock.owner()["host"] != "other-host"
    lock.release()


def test_live_lock_heartbeat_keeps_it_fresh(tmp_path):
    lock = FileLock(tmp_path / "k.lock", heartbeat=0.05, stale_after=0.3)
    assert lock.try_acquire()
    time.sleep(0.6)
    assert not FileLock(tmp_path / "k.lock", stale_after=0.3).is_stale()
    # even a waiter that sees a foreign-looking owner record trusts the heartbeat
    lock.release()


@pytest.mark.parametrize("methods,expected", [
    (("reflink", "hardlink", "symlink", "copy"), None),
    (("symlink", "copy"), "symlink"),
    (("copy",), "copy"),
])
def test_materialize_methods(tmp_path, methods, expected):
    store = Store(tmp_path / "s")
    out = store.out(publish_one(store))
    dest = tmp_path / "ws" / "stage"
    used = materialize([out], dest, extra={"mark": "k"}, methods=methods)
    assert used == (expected or used) and used in methods
    f = dest / "sub" / "f.bin"
    assert f.read_bytes() == b"hello" and (dest / "mark").read_text() == "k"
    src = out / "sub" / "f.bin"
    if used == "hardlink":
        assert f.stat().st_ino == src.stat().st_ino
    if used == "symlink":
        assert f.is_symlink()
    # replacing is atomic: a second materialize swaps the whole directory; trees merge
    materialize([out, store.action(KEY) / "info"], dest, extra={"mark": "k2"}, methods=methods)
    assert (dest / "mark").read_text() == "k2" and not list(dest.parent.glob(".stage.*"))
    assert (dest / "timings.json").is_file() and (dest / "sub" / "f.bin").is_file()


def test_verify_quarantines_corrupted_entry(tmp_path):
    store = Store(tmp_path)
    bad_digest = publish_one(store, KEY)
    good = publish_one(store, "cd" * 32, b"other")
    f = store.out(bad_digest) / "sub" / "f.bin"
    os.chmod(f, 0o644)
    f.write_bytes(b"HELLO")
    checked, bad = verify(tmp_path)
    assert checked == 2 and bad == [bad_digest]
    assert store.output_of(KEY) is None and (tmp_path / "quarantine" / bad_digest).is_dir()
    assert store.output_of("cd" * 32) == good


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_gc_keeps_needed_entries_and_applies_age_and_budget(tiny_project, monkeypatch):
    settings = tiny_project.settings(monkeypatch)
    tiny_project.doit("recipe=tiny")
    store = Store(tiny_project.store)
    needed = set(store.outputs())
    assert len(needed) == 2 and len(list(store.actions())) == 2
    old_key, new_key = "01" * 32, "02" * 32
    old, new = publish_one(store, old_key, b"o" * 1000), publish_one(store, new_key, b"n" * 1000)
    age(store.output(old), 90 * 86400)
    age(store.output(next(iter(needed))), 90 * 86400)  # old but needed: kept
    age(store.output(new), 7200)  # past gc's grace period
    for key in (old_key, new_key):
        age(store.action(key), 7200)
    assert gc(settings, tiny_project.store, 30, None, dry_run=True) == [old] and store.has_output(old)
    assert gc(settings, tiny_project.store, 30, None) == [old]
    assert set(store.outputs()) == needed | {new} and store.record(old_key) is None  # its record went with it
    assert gc(settings, tiny_project.store, 30, budget_gb=0.0) == [new]
    assert set(store.outputs()) == needed and len(list(store.actions())) == 2  # over budget, yet what recipes need stays


@pytest.mark.slow
def test_gc_recipes_names_which_recipes_are_live(tiny_project, monkeypatch):
    """With --recipes, only the named recipes' entries (and workspaces') stay; an unknown name is refused."""
    settings = tiny_project.settings(monkeypatch)
    tiny_project.write("other.yaml", "extends: tiny\nmodel: {dtype: bfloat16}\n")
    tiny_project.doit("recipe=other")
    store = Store(tiny_project.store)
    others = set(store.outputs())
    tiny_project.doit("recipe=tiny")
    for digest in store.outputs():
        age(store.output(digest), 7200)  # past gc's grace period
    for key in store.actions():
        age(store.action(key), 7200)
    shutil.rmtree(tiny_project.artifacts / "other")
    assert gc(settings, tiny_project.store, 30, budget_gb=0.0) == []  # every recipe in recipes/ is live
    kept = set(store.outputs()) - others
    removed = gc(settings, tiny_project.store, 30, budget_gb=0.0, recipes="tiny, tiny")
    assert set(removed) == others and set(store.outputs()) == kept  # only `tiny` is live: other's model and bundle go
    with pytest.raises(KilnError, match=r"gc --recipes: no recipe 'nope' in "):
        gc(settings, tiny_project.store, 30, None, recipes="tiny,nope")
    proc = tiny_project.doit("gc", "--recipes", "nope", "recipe=tiny", check=False)
    assert proc.returncode != 0 and "gc --recipes: no recipe 'nope'" in proc.stdout + proc.stderr


def test_gc_removes_the_old_layout_and_orphan_records(tiny_project, monkeypatch, capsys):
    """Entries of the store layout before output digests are never read (every key changed with
    it): gc removes them after the grace period. A record whose output was quarantined goes too."""
    settings = tiny_project.settings(monkeypatch)
    legacy = tiny_project.store / "entries" / "ab" / KEY
    (legacy / "out").mkdir(parents=True)
    (legacy / "meta.json").write_text("{}")
    store = Store(tiny_project.store)
    orphan = "07" * 32
    store.quarantine(publish_one(store, orphan))
    age(store.action(orphan), 7200)
    gc(settings, tiny_project.store, 30, None)
    assert (tiny_project.store / "entries").is_dir()  # within the grace period
    age(tiny_project.store / "entries", 7200)
    gc(settings, tiny_project.store, 30, None)
    assert not (tiny_project.store / "entries").exists() and store.record(orphan) is None
    assert "the store layout before output digests" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["reflink", "hardlink", "copy"])
def test_link_tree_never_writes_through_an_existing_hard_link(tmp_path, method):
    """Linking into a directory that already holds a hard link of the source must leave the
    source intact (a truncating open once emptied a store entry's weight file this way)."""
    from pipeline.engine.materialize import link_tree

    src, dst = tmp_path / "entry", tmp_path / "scratch"
    src.mkdir()
    (src / "weights.data").write_bytes(b"x" * 4096)
    link_tree(src, dst, methods=("hardlink",))
    with pytest.raises(OSError):
        link_tree(src, dst, methods=(method,))
    assert (src / "weights.data").read_bytes() == b"x" * 4096


def test_two_entries_shipping_the_same_file_name_are_refused_not_overwritten(tmp_path):
    """Two store entries linked into one folder with the fallbacks a bundle uses: the second
    file of the same name is refused (copy would have overwritten the first entry's hard link,
    i.e. the first entry's file in the store)."""
    from pipeline.engine.materialize import link_tree

    first, second, bundle = tmp_path / "first", tmp_path / "second", tmp_path / "bundle"
    for entry, data in ((first, b"first"), (second, b"second")):
        entry.mkdir()
        (entry / "report.json").write_bytes(data)
    link_tree(first, bundle, ("reflink", "hardlink", "copy"))
    with pytest.raises(FileExistsError):
        link_tree(second, bundle, ("reflink", "hardlink", "copy"))
    assert (first / "report.json").read_bytes() == b"first" == (bundle / "report.json").read_bytes()


def test_publish_drops_tmp_and_refuses_anything_beside_out(tmp_path):
    """Scratch files go to tmp/ (dropped); a file a stage writes next to out/ would be published
    outside the manifest, unseen by verify: refused, nothing published, the scratch stays for gc."""
    store = Store(tmp_path)
    scratch = store.new_scratch(KEY)
    (scratch / "out" / "result.txt").write_text("ok")
    (scratch / "tmp" / "big.onnx").write_bytes(b"x" * 1000)
    (scratch / "weights_only").mkdir()
    (scratch / "weights_only" / "w.onnx").write_bytes(b"w")
    with pytest.raises(KilnError, match=r"the stage wrote weights_only beside its output dir; .*ctx\.tmp"):
        store.publish(scratch, KEY, {})
    assert store.output_of(KEY) is None and not (scratch / "tmp").exists()

    (scratch / "weights_only" / "w.onnx").unlink()
    (scratch / "weights_only").rmdir()
    (scratch / "info" / "result.txt").write_text("clash")
    with pytest.raises(KilnError, match=r"result.txt written to both ctx.out and ctx.info"):
        store.publish(scratch, KEY, {})
    (scratch / "info" / "result.txt").unlink()
    (scratch / "log.txt").write_text("log")
    digest, kept = store.publish(scratch, KEY, {})
    assert kept and sorted(p.name for p in store.action(KEY).iterdir()) == ["action.json", "info", "log.txt"]
    assert sorted(p.name for p in store.output(digest).iterdir()) == ["manifest.json", "out"]
    assert list(store.manifest(digest)["files"]) == ["result.txt"]


def test_doit_gc_and_python_m_pipeline_gc_agree(tiny_project, monkeypatch):
    """One store (KILN_STORE / pyproject, never a recipe's), one set of defaults, exit 0 even when
    there is nothing to remove (doit used to fail on gc's empty list)."""
    from pipeline.cli.gc import OPTIONS

    tiny_project.doit("recipe=tiny")
    store = Store(tiny_project.store)
    old = publish_one(store, "01" * 32)
    age(store.output(old), 7200)  # past gc's grace period
    for argv in ([sys.executable, "-m", "pipeline", "gc", "--dry-run"],
                 [sys.executable, "-m", "doit", "-f", "dodo.py", "recipe=tiny", "gc", "--dry-run"]):
        proc = subprocess.run(argv, env=tiny_project.env(), capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "gc: kept 3 outputs" in proc.stdout and "would remove" not in proc.stdout  # 30 days: too young
    help_text = subprocess.run([sys.executable, "-m", "pipeline", "gc", "--help"], capture_output=True, text=True,
                               cwd=ROOT).stdout
    help_text = " ".join(help_text.split())  # argparse wraps lines
    doit_help = subprocess.run([sys.executable, "-m", "doit", "-f", "dodo.py", "recipe=tiny", "help", "gc"],
                               env=tiny_project.env(), capture_output=True, text=True, cwd=ROOT).stdout
    for _name, flag, _kind, default, _text in OPTIONS:
        assert flag in help_text and flag in doit_help
        assert default is False or f"default: {default}" in help_text
    empty = subprocess.run([sys.executable, "-m", "doit", "-f", "dodo.py", "recipe=tiny", "gc", "--max-age-days", "0"],
                           env=tiny_project.env(), capture_output=True, text=True, cwd=ROOT)
    assert empty.returncode == 0 and f"removed output {old[:16]}" in empty.stdout
    again = subprocess.run([sys.executable, "-m", "doit", "-f", "dodo.py", "recipe=tiny", "gc"], env=tiny_project.env(),
                           capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0 and "removed" not in again.stdout


def test_gc_spares_fresh_and_locked_entries_and_counts_hard_links_once(tiny_project, monkeypatch, capsys):
    """Another checkout may be using an output it just built (grace period) or rebuilding one (live
    lock); outputs sharing hard-linked files free their bytes only once the last one goes."""
    settings = tiny_project.settings(monkeypatch)
    store = Store(tiny_project.store)
    fresh, locked, a, b = "03" * 32, "04" * 32, "05" * 32, "06" * 32
    digests = {key: publish_one(store, key, key.encode() * 100_000) for key in (fresh, locked, a)}
    scratch = store.new_scratch(b)  # b's only file is a hard link of a's: a few hundred kB on disk for both
    os.link(store.out(digests[a]) / "sub" / "f.bin", scratch / "out" / "f.bin")
    digests[b], _ = store.publish(scratch, b, {})
    for key in (locked, a, b):
        age(store.output(digests[key]), 90 * 86400)
    lock = store.lock(locked)
    assert lock.try_acquire()
    try:
        removed = gc(settings, tiny_project.store, 30, budget_gb=0.0)
    finally:
        lock.release()
    assert sorted(removed) == sorted([digests[a], digests[b]])
    assert store.has_output(digests[fresh]) and store.has_output(digests[locked])
    freed = sorted(re.findall(r"\(([\d.]+) MB freed", capsys.readouterr().out))
    assert freed == ["0.0", "6.4"]  # the shared inode's bytes, counted once
