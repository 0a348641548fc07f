"""Every stage by name: the explicit name → module map, imported lazily.

The only module that imports stage modules. A stage named `<backend>.<verb>`
lives in `pipeline/<backend>/<verb>.py`; a backend-neutral stage `<name>` in
`pipeline/generic/<name>.py`. Adding a stage is one module and one line here.
The map's order is the recipe reference's order and the tie-break of the plan.
"""
from __future__ import annotations

import importlib
from functools import cache
from typing import TYPE_CHECKING, Any

from pipeline.engine.errors import KilnError
from pipeline.engine.stage import Stage

if TYPE_CHECKING:
    from pipeline.engine.settings import Settings
    from pipeline.recipe.load import Recipe

STAGES: dict[str, str] = {
    # backend-neutral
    "model": "pipeline.generic.model",
    "text": "pipeline.generic.text",
    "reference": "pipeline.generic.reference",
    "report": "pipeline.generic.report",
    "bundle": "pipeline.generic.bundle",
    # Qualcomm: ONNX export, PTQ, HTP context binaries, Genie
    "qnn.export": "pipeline.qnn.export",
    "qnn.quantize": "pipeline.qnn.quantize",
    "qnn.compile": "pipeline.qnn.compile",
    "qnn.genie_config": "pipeline.qnn.genie_config",
    "qnn.verify": "pipeline.qnn.verify",
    "qnn.perplexity": "pipeline.qnn.perplexity",
    "qnn.tasks": "pipeline.qnn.tasks",
    "qnn.package": "pipeline.qnn.package",
    # llama.cpp: static builds for Arm boards, GGUF variants
    "llamacpp.source": "pipeline.llamacpp.source",
    "llamacpp.build": "pipeline.llamacpp.build",
    "llamacpp.convert": "pipeline.llamacpp.convert",
    "llamacpp.imatrix": "pipeline.llamacpp.imatrix",
    "llamacpp.quantize": "pipeline.llamacpp.quantize",
    "llamacpp.perplexity": "pipeline.llamacpp.perplexity",
    "llamacpp.verify": "pipeline.llamacpp.verify",
    "llamacpp.tasks": "pipeline.llamacpp.tasks",
    "llamacpp.report": "pipeline.llamacpp.report",
    "llamacpp.package": "pipeline.llamacpp.package",
    # MNN
    "mnn.export": "pipeline.mnn.export",
    "mnn.config": "pipeline.mnn.config",
    "mnn.verify": "pipeline.mnn.verify",
    "mnn.perplexity": "pipeline.mnn.perplexity",
    "mnn.tasks": "pipeline.mnn.tasks",
    "mnn.package": "pipeline.mnn.package",
    # hand-written int8 runtimes (KuiperLLama's format)
    "kuiper.export": "pipeline.kuiper.export",
    "kuiper.verify": "pipeline.kuiper.verify",
    "kuiper.perplexity": "pipeline.kuiper.perplexity",
    "kuiper.package": "pipeline.kuiper.package",
}


# The backend whose stages serve each target runtime (`recipes/targets/*.yaml`: runtime). A recipe
# is validated and planned against the generic stages, its runtime's backend and any backend its
# `stages:` section names: `doit` imports no other stage module (a no-op build stays fast).
RUNTIME_BACKENDS: dict[str, str] = {"genie": "qnn", "llama.cpp": "llamacpp", "mnn": "mnn", "kuiper": "kuiper"}


def backend(name: str) -> str:
    """`qnn.compile` → `qnn`; a bare name → `generic`."""
    return name.split(".")[0] if "." in name else "generic"


@cache
def stage_class(name: str) -> type[Stage]:
    """Import the stage's module and return the class it defines under that name."""
    if name not in STAGES:
        raise KilnError(f"unknown stage {name!r}; known: {', '.join(STAGES)}")
    module = importlib.import_module(STAGES[name])
    found = [obj for obj in vars(module).values()
             if isinstance(obj, type) and issubclass(obj, Stage) and obj.__dict__.get("name") == name]
    if len(found) != 1:
        raise TypeError(f"{STAGES[name]} must define exactly one Stage named {name!r}, found {len(found)}")
    return found[0]


@cache
def all_stages() -> tuple[type[Stage], ...]:
    return tuple(stage_class(name) for name in STAGES)


def stages_for(doc: dict[str, Any]) -> tuple[type[Stage], ...]:
    """The stages a merged recipe document is validated against: generic ones, its target
    runtime's backend, and the backends of the sections under `stages:`."""
    target = doc.get("target")
    runtime = target.get("runtime") if isinstance(target, dict) else None
    sections = doc.get("stages")
    named = {backend(n) for n in sections if isinstance(n, str)} if isinstance(sections, dict) else set()
    wanted = {"generic", RUNTIME_BACKENDS.get(runtime, "generic")} | named
    return tuple(stage_class(n) for n in STAGES if backend(n) in wanted)


def load_recipe(name: str, settings: Settings | None = None) -> Recipe:
    """A recipe validated against the params of the stages that can serve it (`stages_for`)."""
    from pipeline.recipe.load import load_recipe as load

    return load(name, settings, stages_for)
