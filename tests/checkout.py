"""A copy of this checkout's code, for tests and benches that edit Kiln's own source files
without touching the real ones (imports nothing of Kiln: the copy is what gets imported)."""
from __future__ import annotations

import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def copy_checkout(dest: Path) -> Path:
    """pipeline/, templates/, dodo.py and pyproject.toml copied to `dest` (plus an artifacts/ dir for
    doit's database); run `doit -f dest/dodo.py --dir dest` or import `pipeline` from `dest`."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pipeline", "templates"):
        shutil.copytree(HERE / name, dest / name, ignore=ignore)
    for name in ("dodo.py", "pyproject.toml"):
        shutil.copy2(HERE / name, dest / name)
    (dest / "artifacts").mkdir()
    return dest
