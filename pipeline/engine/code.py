"""A stage's own code as part of its action key.

The code of a stage is its module plus the closure of Kiln modules it imports, found by reading
the source (every `import`, function-level ones included: stages import their heavy helpers
inside `run`), minus PLUMBING below. Third-party packages are not followed: they enter the key
as tool versions (`Stage.tools`). Each module enters by the BLAKE3 of its bytes, looked up
through the stat cache, and its import list is cached the same way, so planning reads no
unchanged file twice.

A comment edit in a stage therefore re-keys it; early cutoff (its output comes out
byte-identical) keeps everything downstream.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

from pipeline import ROOT
from pipeline.engine.hashing import StatCache

# Modules whose changes must not rebuild every stage: they decide how a stage is planned, run,
# stored, validated and linked, never which bytes it writes. (A change to them that did alter
# outputs is a bug the `reproduce` verb catches.) Engine modules that do shape output bytes
# (templating: rendered text that ships; tarball: the archive's bytes) are followed as code.
PLUMBING = frozenset({
    "pipeline",                   # the package marker (ROOT)
    "pipeline.registry",          # which stages exist
    "pipeline.recipe",            # recipe loading: what a recipe means reaches a stage as params
    "pipeline.cli",               # the verbs
    "pipeline.engine.code", "pipeline.engine.cost", "pipeline.engine.errors", "pipeline.engine.fields", "pipeline.engine.hashing",
    "pipeline.engine.keys", "pipeline.engine.lock", "pipeline.engine.materialize", "pipeline.engine.objstore",
    "pipeline.engine.plan", "pipeline.engine.ray_executor", "pipeline.engine.remote",
    "pipeline.engine.proc", "pipeline.engine.progress", "pipeline.engine.run_stage", "pipeline.engine.runner",
    "pipeline.engine.sandbox", "pipeline.engine.settings", "pipeline.engine.stage", "pipeline.engine.store",
    "pipeline.engine.tools",
})


def is_plumbing(module: str) -> bool:
    """`module` is in PLUMBING or inside a package listed there (the root package only by itself)."""
    return module == "pipeline" or any(module == p or module.startswith(p + ".") for p in PLUMBING - {"pipeline"})


def module_file(module: str) -> Path | None:
    """The file of a Kiln module: where it was imported from, else `a.b` → <repo>/a/b.py or
    a/b/__init__.py; None if there is none."""
    loaded = getattr(sys.modules.get(module), "__file__", None)
    if loaded:
        return Path(loaded)
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(source: str, module: str, is_package: bool) -> list[str]:
    """Kiln modules `source` imports at run time (`if TYPE_CHECKING:` blocks left out)."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return sorted(m for m in found if m.split(".")[0] == "pipeline" and module_file(m) is not None)


def code_hashes(module: str, cache: StatCache) -> dict[str, str]:
    """{Kiln module: content hash} of `module` and what it imports, transitively, plumbing left out."""
    out: dict[str, str] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in out or (is_plumbing(name) and name != module):
            continue
        path = module_file(name)
        if path is None:
            continue
        out[name] = cache.file_hash(path)
        is_package = path.name == "__init__.py"
        todo.extend(cache.memo(path, "imports", lambda p=path, n=name, pk=is_package:
                               imported_modules(p.read_text(), n, pk)))
        # importing a.b.c runs a/__init__ and a/b/__init__ too
        todo.extend(".".join(name.split(".")[:i]) for i in range(2, name.count(".") + 1))
    return dict(sorted(out.items()))
