"""The layout rules, read from the source (AST): stage modules are leaves only the registry
imports, the engine names no backend, and a stage's file follows from its name."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

from pipeline import ROOT
from pipeline.engine.stage import Stage
from pipeline.registry import STAGES, all_stages, backend

PIPELINE = ROOT / "pipeline"
BACKENDS = ("qnn", "llamacpp", "mnn", "kuiper")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it (function-level imports too), resolved to absolute names."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def sources() -> list[Path]:
    return sorted(p for p in PIPELINE.rglob("*.py") if "__pycache__" not in p.parts)


def test_only_the_registry_imports_stage_modules():
    stage_modules = set(STAGES.values())
    offenders = {module_name(p): sorted(imported(p) & stage_modules) for p in sources()
                 if p != PIPELINE / "registry.py"}
    assert {m: i for m, i in offenders.items() if i} == {}


def test_the_engine_imports_no_backend_and_no_registry():
    forbidden = tuple(f"pipeline.{b}" for b in (*BACKENDS, "generic")) + ("pipeline.registry", "pipeline.cli")
    offenders = {module_name(p): sorted(m for m in imported(p) if m.startswith(forbidden))
                 for p in sorted((PIPELINE / "engine").rglob("*.py"))}
    assert {m: i for m, i in offenders.items() if i} == {}


def test_a_backend_imports_no_other_backend_or_cli():
    for b in BACKENDS:
        others = tuple(f"pipeline.{o}" for o in BACKENDS if o != b) + ("pipeline.cli", "pipeline.registry")
        offenders = {module_name(p): sorted(m for m in imported(p) if m.startswith(others))
                     for p in sorted((PIPELINE / b).rglob("*.py"))}
        assert {m: i for m, i in offenders.items() if i} == {}, b


def test_a_stage_file_follows_from_its_name():
    for cls in all_stages():
        verb = cls.name.split(".", 1)[1] if "." in cls.name else cls.name
        assert cls.name.count(".") <= 1 and verb.isidentifier(), cls.name
        assert STAGES[cls.name] == cls.__module__ == f"pipeline.{backend(cls.name)}.{verb}"
        assert inspect.getsourcefile(cls) == str(PIPELINE / backend(cls.name) / f"{verb}.py")


def test_every_stage_class_is_registered():
    """A Stage with a name in a backend package but missing from the map would silently never run."""
    named = set()
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(s, ast.Assign) and any(getattr(t, "id", "") == "name" for t in s.targets)
                    for s in node.body) and module_name(path) != "pipeline.engine.stage":
                named.add(module_name(path))
    assert named == set(STAGES.values())
    assert all(issubclass(c, Stage) and c.version >= 1 for c in all_stages())


def test_each_runtime_is_served_by_its_backend_only():
    """RUNTIME_BACKENDS (what `doit` imports for a recipe) agrees with what the stages declare."""
    from pipeline.registry import RUNTIME_BACKENDS

    for cls in all_stages():
        for runtime in cls.runtimes:
            assert backend(cls.name) in ("generic", RUNTIME_BACKENDS[runtime]), (cls.name, runtime)
    assert {RUNTIME_BACKENDS[r] for c in all_stages() for r in c.runtimes} == {backend(n) for n in STAGES} - {"generic"}


def test_a_recipe_loads_only_its_backends_stages_and_still_checks_other_sections(project):
    """A llama.cpp recipe imports no Qualcomm stage; a `stages:` section of another backend is
    still validated against that stage's params."""
    import subprocess
    import sys

    project.write("b.yaml", "model: {name: m, hf_dir: /nonexistent}\ntarget: rk3568\nscheme: fp32\n")
    project.write("c.yaml", "extends: b\nstages:\n  qnn.compile: {vtcm_mb: -1}\n")
    code = ("import sys; from pipeline.registry import load_recipe\n"
            "r = load_recipe('b'); print(sorted({c.name.split('.')[0] for c in r.stages if '.' in c.name}),"
            " [m for m in sys.modules if m.startswith(('pipeline.qnn', 'pipeline.mnn', 'pipeline.kuiper'))])\n"
            "load_recipe('c')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=project.env())
    assert proc.stdout.splitlines()[0] == "['llamacpp'] []", proc.stdout + proc.stderr
    assert "c.yaml:3" in proc.stderr and "vtcm_mb" in proc.stderr, proc.stderr
