"""What a stage cost (wall, CPU, tree peak RSS, bytes) in its action record, `costs` and `explain`;
the machine-wide memory ledger that keeps stages that do not fit together from running at once."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import wait_for

from pipeline.engine.cost import GB, Cost, MemoryLedger, TreeSampler, wait_rusage
from pipeline.engine.store import Store


def test_every_built_stage_records_its_cost_and_costs_prints_the_table(tiny_project):
    tiny_project.doit("recipe=tiny")
    store = Store(tiny_project.store)
    records = {r["stage"]: r for r in (store.record(k) for k in store.actions())}
    model = records["model"]["cost"]
    manifest = store.manifest(records["model"]["output"])
    assert model["output_bytes"] == sum(f["size"] for f in manifest["files"].values())
    assert model["cpu_s"] > 0.5 and model["wall_s"] > 0.5   # torch + transformers imported, a model saved
    assert 100 << 20 < model["peak_rss_bytes"] < 8 * GB

    out = subprocess.run([sys.executable, "-m", "pipeline", "costs", "tiny"], env=tiny_project.env(),
                         capture_output=True, text=True, check=True).stdout
    assert re.search(r"^\| model \| [\d.]+ \| [\d.]+ \| [\d.]+ MiB \| [\d.]+ KiB \| .* \| \S+ \| 20\d\d-", out, re.M), out
    assert re.search(r"^\| \*\*total\*\* \(2 of 2 stages\) \|", out, re.M) and "of outputs." in out
    page = (tiny_project.artifacts / "tiny" / "costs.md").read_text()
    assert page.startswith("# Stage costs: tiny") and "| bundle |" in page
    explain = tiny_project.doit("explain", "recipe=tiny").stdout
    assert re.search(r"tiny:model \[\w+…\]: up to date \(cost \d+ s wall, \d+ s CPU, peak RSS [\d.]+ MiB", explain)


def test_tree_sampler_sees_a_grandchild_and_not_the_parents_memory():
    # the child starts a grandchild that holds ~300 MB, then both sleep: the tree's peak includes it
    code = textwrap.dedent("""
        import subprocess, sys
        g = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(300 << 20); time.sleep(1.5)"])
        g.wait()
    """)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", code])
    with TreeSampler(proc.pid) as sampler:
        rc, usage = wait_rusage(proc)
    cost = Cost.measured(time.monotonic() - t0, usage, sampler.peak)
    assert rc == 0 and proc.returncode == 0
    assert cost.peak_rss_bytes >= 300 << 20
    assert cost.wall_s >= 1.5 and cost.cpu_s < cost.wall_s
    # a parent holding 1 GB starts a small child: the child's peak is its own (ru_maxrss would say 1 GB)
    held = bytearray(1 << 30)
    held[::4096] = b"x" * len(held[::4096])
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    with TreeSampler(proc.pid) as sampler:
        _, usage = wait_rusage(proc)
    assert usage.ru_maxrss * 1024 >= 1 << 30   # what rusage reports: inherited across fork + exec
    assert 0 < Cost.measured(0.5, usage, sampler.peak).peak_rss_bytes < 200 << 20
    del held


def test_the_ledger_admits_what_fits_refuses_the_rest_and_forgets_the_dead(tmp_path):
    ledger = MemoryLedger(tmp_path, budget=10 * GB)
    first = ledger.try_reserve(6 * GB, "a:model")
    assert first and ledger.try_reserve(5 * GB, "b:model") is None
    assert ledger.holders() == ["a:model (6.0 GiB)"]
    second = ledger.try_reserve(4 * GB, "c:export")
    assert second and ledger.try_reserve(1, "d") is None
    ledger.release(first)
    assert ledger.holders() == ["c:export (4.0 GiB)"]
    ledger.release(second)
    assert ledger.try_reserve(50 * GB, "huge") is not None  # larger than the budget: runs alone
    # an entry of a process that is gone does not hold memory
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    doc = json.loads(ledger.file.read_text())
    doc[0]["pid"] = int(dead.stdout)
    ledger.file.write_text(json.dumps(doc))
    assert ledger.holders() == [] and ledger.try_reserve(9 * GB, "e") is not None
    # hand-edited or hostile entries hold nothing: pid 0 (os.kill(0, 0) would succeed), no size, not a list
    live = json.loads(ledger.file.read_text())
    ledger.file.write_text(json.dumps([*live, {"id": "x", "host": live[0]["host"], "pid": 0, "bytes": 10 * GB},
                                       {"id": "y", "host": live[0]["host"], "pid": os.getpid()}, "junk"]))
    assert ledger.holders() == ["e (9.0 GiB)"]
    ledger.file.write_text('{"not": "a list"}')
    assert ledger.holders() == [] and ledger.try_reserve(1, "f") is not None


def test_a_stage_that_does_not_fit_waits_for_the_memory(tiny_project):
    """doit waits while another process holds the budget, says for whom, then builds."""
    ledger = MemoryLedger(tiny_project.artifacts / ".locks", budget=2 * GB)
    (tiny_project.artifacts / ".locks").mkdir(exist_ok=True)
    held = ledger.try_reserve(int(1.5 * GB), "other:qnn.export")  # this test process: alive
    proc = subprocess.Popen([sys.executable, "-m", "doit", "-f", str(tiny_project.root / "dodo.py"), "--dir",
                             str(tiny_project.root), "recipe=tiny"], env=tiny_project.env(KILN_MEMORY_GB="2"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    os.set_blocking(proc.stdout.fileno(), False)

    def saw_wait() -> bool:
        lines.extend(proc.stdout.readlines())
        return any("tiny:model: expects" in line and "waiting for other:qnn.export (1.5 GiB)" in line for line in lines)
    wait_for(saw_wait, 120)
    time.sleep(1)
    assert not any("tiny:model: building" in line for line in lines)
    ledger.release(held)
    os.set_blocking(proc.stdout.fileno(), True)
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and "kiln: tiny:model: building" in rest


@pytest.mark.parametrize(("name", "value", "message"), [
    ("KILN_MEMORY_GB", "abc", "KILN_MEMORY_GB / [tool.kiln].memory_gb: 'abc' is not a size in GB (0.5 to 1048576)"),
    ("KILN_MEMORY_GB", "0.1", "'0.1' is not a size in GB"),
    ("KILN_MEMORY_GB", "nan", "'nan' is not a size in GB"),
    ("KILN_HEAVY_SLOTS", "two", "KILN_HEAVY_SLOTS / [tool.kiln].heavy_slots: 'two' is not a slot count (1 to 256)"),
    ("KILN_HEAVY_SLOTS", "0", "'0' is not a slot count"),
    ("KILN_JOBS", "-t 1", "KILN_JOBS='-t 1': expected a whole number from 1 to 1024"),
    ("KILN_BUILD_JOBS", "0", "KILN_BUILD_JOBS='0': expected a whole number from 1 to 1024"),
])
def test_bad_settings_in_the_environment_are_named(tiny_project, name, value, message):
    proc = tiny_project.doit("recipe=tiny", check=False, **{name: value})
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tiny_project.store / "outputs").exists()


def test_compile_jobs_follow_their_own_setting_else_the_threads(monkeypatch):
    from pipeline.engine.proc import build_jobs, threads

    monkeypatch.setenv("KILN_JOBS", "1")
    monkeypatch.delenv("KILN_BUILD_JOBS", raising=False)
    assert (threads(), build_jobs()) == ("1", "1")
    monkeypatch.setenv("KILN_BUILD_JOBS", "2")
    assert (threads(), build_jobs()) == ("1", "2")
