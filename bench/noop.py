"""(a) No-op `doit recipe=X` over ≥5 GB of stage outputs vs doit's md5 `file_dep` on the same files.

Run: .venv/bin/python bench/noop.py [--gb 5] [--dir /tmp/kiln-bench]
     .venv/bin/python bench/noop.py --built --recipe llama31_8b_rk3568_synthetic --runs 3
       (a recipe as built in the configured store and workspace: every file of its workspace)
Kiln decides up-to-date from keys (no output is read); a plain dodo with
`file_dep` on the outputs re-hashes all of them with md5 once their mtimes
move (`touch`). Prints wall times of both as processes and of the doit run
alone (in-process, libraries already imported), and their ratios.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import GB, bench_env, median_of, populate_store  # noqa: E402
from pipeline import ROOT  # noqa: E402

MD5_DODO = '''
import json, os
FILES = json.load(open(os.environ["BENCH_FILES"]))
DOIT_CONFIG = {"dep_file": os.environ["BENCH_DB"], "backend": "sqlite3", "verbosity": 0}
def task_outputs():
    return {"actions": [], "file_dep": FILES}
'''


def in_process(dodo: Path, args: list[str], cwd: Path) -> None:
    from doit.cmd_base import DodoTaskLoader
    from doit.doit_cmd import DoitMain

    old = os.getcwd()
    os.chdir(cwd)
    saved_fd = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        sys.stdout.flush()
        os.dup2(null, 1)  # doit's reporter writes to fd 1; keep the bench output readable
        rc = DoitMain(DodoTaskLoader(), extra_config={"GLOBAL": {"dodoFile": str(dodo)}}).run(args)
        assert rc == 0, rc
    finally:
        sys.stdout.flush()
        os.dup2(saved_fd, 1)
        os.close(saved_fd)
        os.close(null)
        os.chdir(old)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gb", type=float, default=5.0, help="total size of the stage outputs")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/kiln-bench"))
    ap.add_argument("--recipe", default="smollm2_135m_host")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--built", action="store_true", help="measure --recipe as built in the configured store")
    a = ap.parse_args()
    base = a.dir / "noop"
    base.mkdir(parents=True, exist_ok=True)
    if a.built:
        from pipeline.engine.plan import plan
        from pipeline.engine.runner import ENTRY_MARK
        from pipeline.engine.settings import Settings
        from pipeline.registry import load_recipe

        specs = plan(load_recipe(a.recipe, Settings.from_env()))
        files = sorted(str(f) for s in specs for f in s.workspace.rglob("*")
                       if f.is_file() and not f.is_symlink() and f.name != ENTRY_MARK)
        env = dict(os.environ)
    else:
        specs = populate_store(base, a.recipe, a.gb / 2)
        files = sorted(str(f) for s in specs for f in s.workspace.rglob("*.bin"))
        env = bench_env(base)
    total = sum(os.path.getsize(f) for f in files) / GB
    py = sys.executable

    def kiln_proc() -> None:
        out = subprocess.run([py, "-m", "doit", "-f", str(ROOT / "dodo.py"), f"recipe={a.recipe}"],
                             env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        assert "kiln:" not in out, out  # nothing was built or linked: a true no-op

    md5_dodo = base / "dodo_md5.py"
    md5_dodo.write_text(MD5_DODO)
    (base / "files.json").write_text(__import__("json").dumps(files))  # a file: thousands of paths overflow the env
    md5_env = {**env, "BENCH_FILES": str(base / "files.json"), "BENCH_DB": str(base / "md5.db")}

    def md5_proc() -> None:
        subprocess.run([py, "-m", "doit", "-f", str(md5_dodo)], env=md5_env, cwd=base, check=True,
                       capture_output=True)

    def touch() -> None:
        for f in files:
            os.utime(f)

    # Workspace files are hard links into the store, whose entries Kiln checks by size, mtime and
    # inode: put the mtimes back after the md5 runs, or Kiln (rightly) quarantines them as edited.
    mtimes = {f: os.stat(f).st_mtime_ns for f in files}

    def restore() -> None:
        for f, ns in mtimes.items():
            os.utime(f, ns=(ns, ns))

    kiln_proc()
    md5_proc()  # first run records the md5s
    t_py = median_of(a.runs, lambda: subprocess.run([py, "-c", "pass"], check=True))
    t_kiln = median_of(a.runs, kiln_proc)
    t_md5 = median_of(max(1, a.runs // 2), md5_proc, touch)
    restore()

    os.environ.update(env)
    in_process(ROOT / "dodo.py", [f"recipe={a.recipe}"], ROOT)  # imports once
    t_kiln_in = median_of(a.runs, lambda: in_process(ROOT / "dodo.py", [f"recipe={a.recipe}"], ROOT))
    os.environ.update(md5_env)
    t_md5_in = median_of(max(1, a.runs // 2), lambda: in_process(md5_dodo, [], base), touch)
    restore()
    kiln_proc()  # still a no-op: nothing of the store was touched

    print(f"stage outputs: {len(files)} files, {total:.2f} GB in {len(specs)} store entries")
    print(f"python start-up:                 {t_py:.3f} s")
    print(f"kiln no-op (process):            {t_kiln:.3f} s  ({t_kiln - t_py:.3f} s beyond start-up)")
    print(f"doit md5 file_dep after touch:   {t_md5:.3f} s")
    print(f"kiln no-op (doit run in-process): {t_kiln_in * 1000:.1f} ms")
    print(f"md5 dodo   (doit run in-process): {t_md5_in:.3f} s")
    print(f"ratio, processes:  {t_md5 / t_kiln:.0f}x")
    print(f"ratio, doit runs:  {t_md5_in / t_kiln_in:.0f}x")


if __name__ == "__main__":
    main()
