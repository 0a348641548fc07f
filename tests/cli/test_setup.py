"""What setup.sh leaves in .venv besides the packages."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="runs in setup.sh's .venv")
def test_the_venv_caches_bytecode_under_its_prefix_even_when_the_environment_says_not_to(tmp_path):
    (tmp_path / "probe_module.py").write_text("VALUE = 1\n")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(tmp_path)}
    env.pop("PYTHONPYCACHEPREFIX", None)
    subprocess.run([sys.executable, "-c", "import probe_module"], env=env, check=True)
    assert not (tmp_path / "__pycache__").exists()  # never beside the sources
    cached = Path(sys.prefix, "pycache", *tmp_path.parts[1:])
    assert [p.name.split(".")[0] for p in cached.glob("*.pyc")] == ["probe_module"]
