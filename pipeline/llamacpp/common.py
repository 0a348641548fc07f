"""Helpers shared by the llama.cpp stages: node names, GGUF files, the host tools.

Stage modules import this, never each other, so each stays a leaf the registry alone imports.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.engine.errors import KilnError
from pipeline.engine.stage import Stage, node_id

if TYPE_CHECKING:
    from pipeline.engine.stage import StageContext
    from pipeline.recipe.load import Recipe

RUNTIME = "llama.cpp"  # the target runtime every stage here serves
SOURCE, BUILD, CONVERT, IMATRIX = "llamacpp.source", "llamacpp.build", "llamacpp.convert", "llamacpp.imatrix"
QUANTIZE, PERPLEXITY, VERIFY, REPORT = "llamacpp.quantize", "llamacpp.perplexity", "llamacpp.verify", "llamacpp.report"
TASKS = "llamacpp.tasks"
TASK_RUNNER = "llama-completion"  # the host tool llamacpp.tasks generates with
HOST_BUILD = node_id(BUILD, "host")
FLOAT = "float"  # the perplexity variant of the unquantized GGUF
SOURCE_INFO = "kiln-source.json"  # llamacpp.source's record of the tree's commit


def device_build(recipe: Recipe) -> str:
    return node_id(BUILD, recipe.target.name)


def quant_node(gguf_type: str) -> str:
    return node_id(QUANTIZE, gguf_type)


def gguf_in(directory: Path) -> Path:
    """The one .gguf file a stage output holds."""
    found = sorted(directory.glob("*.gguf"))
    if len(found) != 1:
        raise KilnError(f"expected one .gguf in {directory}, found {[f.name for f in found]}")
    return found[0]


def host_tool(ctx: StageContext, name: str) -> Path:
    return ctx.inputs[HOST_BUILD] / "bin" / name


def gguf_name(model_name: str, gguf_type: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-._" else "-" for c in model_name)
    return f"{safe}-{gguf_type}.gguf"


def gguf_types(recipe: Recipe) -> list[str]:
    """The scheme's quant types, de-duplicated, in order (the first is the bundle's default)."""
    return list(dict.fromkeys(recipe.scheme.gguf_types))


def shipped_types(recipe: Recipe) -> list[str]:
    """The quant types the bundle carries: all of them, or the primary only (`llamacpp.quantize.ship`)."""
    types = gguf_types(recipe)
    return types if recipe.stage_params(QUANTIZE)["ship"] == "all" else types[:1]


def perplexity_variants(recipe: Recipe) -> list[str]:
    return [FLOAT, *gguf_types(recipe)]


def verify_params(recipe: Recipe, gguf_type: str) -> dict[str, Any]:
    """What llamacpp.verify runs for one quant type (the package's README repeats it)."""
    return {**recipe.stage_params(VERIFY), "qemu_cpu": recipe.target.cpu.qemu_cpu, "arch": recipe.target.cpu.arch}


class LlamacppStage(Stage):
    """Base of the llama.cpp stages."""

    runtimes = (RUNTIME,)


class PerQuantType(LlamacppStage):
    """A llama.cpp stage that runs once per quant type of the scheme."""

    @classmethod
    def variants(cls, recipe: Recipe) -> list[str]:
        return gguf_types(recipe)
