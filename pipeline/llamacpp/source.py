"""llamacpp.source: the llama.cpp source tree every llama.cpp stage builds or runs from.

Default: the tree vendored in the llama-cpp-python sdist that setup.sh fetches
from PyPI (never committed). `stages.llamacpp.source.tree` names a user's
checkout instead. The key holds the tree's content hash (and its git commit):
a different tree rebuilds exactly the stages downstream of this one.
"""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from pipeline.engine.errors import KilnError
from pipeline.engine.fields import LocalPath
from pipeline.engine.stage import StageContext, Strict
from pipeline.generic.downloads import LLAMA_CPP_SDIST
from pipeline.llamacpp.common import SOURCE, SOURCE_INFO, LlamacppStage

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe

VENDORED = "vendor/llama.cpp/"


class SourceParams(Strict):
    tree: LocalPath | None = Field(None, description="A llama.cpp checkout to build instead of the vendored tree "
                                               "of llama-cpp-python 0.3.36 (build 0c1e570).")


def git_commit(tree: Path) -> str | None:
    """HEAD's commit of a checkout, read from .git without running git."""
    git = tree / ".git"
    if git.is_file():  # a submodule/worktree: "gitdir: <path>"
        git = (tree / git.read_text().split(":", 1)[1].strip()).resolve()
    head = git / "HEAD"
    if not head.is_file():
        return None
    ref = head.read_text().strip()
    if not ref.startswith("ref: "):
        return ref
    ref_file = git / ref[5:]
    if ref_file.is_file():
        return ref_file.read_text().strip()
    packed = git / "packed-refs"
    for line in packed.read_text().splitlines() if packed.is_file() else []:
        if line.endswith(" " + ref[5:]):
            return line.split()[0]
    return None


def _ignored(_dir: str, names: list[str]) -> list[str]:
    return [n for n in names if n.startswith(".") or n.startswith("build")]


class LlamacppSource(LlamacppStage):
    """The llama.cpp source tree."""

    name = SOURCE
    version = 1
    Params = SourceParams

    @classmethod
    def params(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        tree = recipe.stage_params(cls.name)["tree"]
        commit = git_commit(recipe.resolve_path(tree)) if tree else None
        return {"kind": "tree" if tree else "sdist", "commit": commit}

    @classmethod
    def sources(cls, recipe: Recipe, variant: str = "") -> dict[str, Path]:
        tree = recipe.stage_params(cls.name)["tree"]
        if tree is None:
            return {"sdist": LLAMA_CPP_SDIST.resolve("the llama.cpp source (llama-cpp-python sdist)")}
        path = recipe.resolve_path(tree)
        if not (path / "CMakeLists.txt").is_file() or not (path / "convert_hf_to_gguf.py").is_file():
            raise KilnError(f"{recipe.where('stages', cls.name, 'tree')}: stages.{cls.name}.tree: "
                            f"{path} is not a llama.cpp checkout (no CMakeLists.txt / convert_hf_to_gguf.py)")
        return {"tree": path}

    def run(self, ctx: StageContext) -> None:
        commit = ctx.params["commit"]
        if "tree" in ctx.sources:
            shutil.copytree(ctx.sources["tree"], ctx.out, dirs_exist_ok=True, ignore=_ignored, symlinks=True)
        else:
            commit = self._extract_sdist(ctx.sources["sdist"], ctx.out)
        (ctx.out / SOURCE_INFO).write_text(json.dumps({"commit": commit, "kind": ctx.params["kind"]}, indent=2) + "\n")
        ctx.log.info(f"llama.cpp tree ready (commit {commit or 'unknown'})")

    @staticmethod
    def _extract_sdist(sdist: Path, out: Path) -> str | None:
        commit = None
        with tarfile.open(sdist) as tar:
            for member in tar:
                root, _, rel = member.name.partition("/")
                if rel == ".git/modules/vendor/llama.cpp/HEAD":
                    commit = tar.extractfile(member).read().decode().strip()
                if not rel.startswith(VENDORED) or rel == VENDORED.rstrip("/"):
                    continue
                inner = rel[len(VENDORED):]
                if not inner or inner == ".git" or inner.startswith((".git/", "build")):
                    continue  # the dangling submodule .git file would confuse cmake's version lookup
                member.name = inner
                tar.extract(member, out, filter="data")
        if not (out / "CMakeLists.txt").is_file():
            raise KilnError(f"{sdist.name} holds no {VENDORED} tree")
        return commit
