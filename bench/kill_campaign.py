"""kill -9 campaign: builds of a tiny seeded Llama killed at random moments, then checked.

Run: .venv/bin/python bench/kill_campaign.py [--iterations 200] [--seed 1415] [--dir /tmp/kiln-kill]

Each round drops some store entries (so there is work), starts `doit`, kills it with SIGKILL after
a random delay (doit alone or its whole process group), waits for the stage process to be gone,
and checks every entry against its manifest. At the end one build must give the clean build's
tarball byte for byte. Then it times how long a waiting builder takes to take over the lock of a
builder killed while holding it: on the same host (dead pid: at once) and from another host (no
heartbeat: after KILN_LOCK_STALE_AFTER, 10 s here). Prints one table; figures, not a verdict.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import ROOT  # noqa: E402
from pipeline.engine.store import Store, differs_from_manifest  # noqa: E402
from tests.tiny_models import save_tiny_llama  # noqa: E402

STALE_AFTER = 10.0


def stage_running(store: Path) -> bool:
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(store) in (proc / "cmdline").read_bytes().decode(errors="replace") \
                    and (proc / "stat").read_text().split(")")[-1].split()[0] != "Z":
                return True
        except OSError:
            continue
    return False


def doit(env: dict[str, str], **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "--dir", str(ROOT), "recipe=tiny"],
                            env={**env, **extra}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def wait(predicate, timeout: float = 60.0) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.05)
    return time.monotonic() - t0


def corrupt_or_partial(store: Store) -> tuple[int, int]:
    """(outputs whose files differ from their manifest, outputs or action records half published
    or naming an output that is not there)."""
    corrupt = partial = 0
    for output in (store.root / "outputs").glob("*/*"):
        if not (output / "manifest.json").is_file():
            partial += 1
        elif differs_from_manifest(output / "out"):
            corrupt += 1
    for action in (store.root / "actions").glob("*/*"):
        record = store.record(action.name)
        partial += record is None or not store.has_output(record["output"])
    return corrupt, partial


def takeover_seconds(env: dict[str, str], store: Store, other_host: bool) -> float:
    for key in list(store.actions()):
        store.forget(key)
    first = doit(env, KILN_HOST_ID="host-a")
    wait(lambda: stage_running(store.root))
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    lock = next((store.root / "locks").glob("*.lock"))
    second = doit(env, KILN_HOST_ID="host-b" if other_host else "host-a", KILN_LOCK_STALE_AFTER=str(STALE_AFTER))
    seconds = wait(lambda: not lock.exists() or f'"pid": {second.pid}' in lock.read_text(errors="replace"), 120)
    second.wait()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1415)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/kiln-kill"))
    a = ap.parse_args()
    shutil.rmtree(a.dir, ignore_errors=True)
    (a.dir / "recipes").mkdir(parents=True)
    for sub in ("targets", "schemes"):
        shutil.copytree(ROOT / "recipes" / sub, a.dir / "recipes" / sub)
    model = save_tiny_llama(a.dir / "tiny-llama")
    (a.dir / "recipes" / "tiny.yaml").write_text(f"model: {{name: tiny-llama, hf_dir: {model}}}\ntarget: x86_64\n"
                                                 "scheme: fp32\nstages: {bundle: {compress_level: 1}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update(KILN_RECIPES=str(a.dir / "recipes"), KILN_ARTIFACTS=str(a.dir / "artifacts"),
               KILN_STORE=str(a.dir / "store"))
    store = Store(a.dir / "store")
    tarball = a.dir / "artifacts" / "tiny" / "bundle" / "tiny.tar.gz"
    doit(env).wait()
    clean = tarball.read_bytes()

    rng = random.Random(a.seed)
    scratch_left = group_kills = 0
    worst = (0, 0)
    for _ in range(a.iterations):
        for key in list(store.actions()):
            if rng.random() < 0.6:
                store.forget(key)
        proc = doit(env)
        time.sleep(rng.uniform(0.0, 4.5))
        if rng.random() < 0.5:
            os.kill(proc.pid, signal.SIGKILL)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            group_kills += 1
        proc.wait()
        wait(lambda: not stage_running(store.root), 10)
        scratch_left += any((store.root / "scratch").glob("*")) if (store.root / "scratch").is_dir() else 0
        found = corrupt_or_partial(store)
        worst = (max(worst[0], found[0]), max(worst[1], found[1]))
        shutil.rmtree(store.root / "scratch", ignore_errors=True)  # what gc does to dead scratch
    doit(env).wait()
    same = tarball.read_bytes() == clean
    same_host = takeover_seconds(env, store, other_host=False)
    other_host = takeover_seconds(env, store, other_host=True)
    print(f"| iterations (seed {a.seed}) | doit killed alone / with its group | rounds that left scratch | "
          "corrupt entries | partial entries | final bundle = clean | lock takeover, same host | "
          f"lock takeover, other host (stale after {STALE_AFTER:.0f} s) |")
    print("|---:|---|---:|---:|---:|---|---:|---:|")
    print(f"| {a.iterations} | {a.iterations - group_kills} / {group_kills} | {scratch_left} | {worst[0]} | {worst[1]} | "
          f"{'yes' if same else 'NO'} | {same_host:.2f} s | {other_host:.2f} s |")


if __name__ == "__main__":
    main()
