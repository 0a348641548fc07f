"""Helpers shared by the llama.cpp stages (seed 001 path)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import KilnError
from .stage import Stage

if TYPE_CHECKING:
    from .recipe import Recipe
    from .stage import StageContext

HOST_BUILD = "llamacpp.build@host"


def device_build(recipe: "Recipe") -> str:
    return f"llamacpp.build@{recipe.target.name}"


def float_gguf_node() -> str:
    return "gguf.convert"


def quant_node(gguf_type: str) -> str:
    return f"gguf.quantize@{gguf_type}"


def gguf_in(directory: Path) -> Path:
    """The one .gguf file a stage output holds."""
    found = sorted(directory.glob("*.gguf"))
    if len(found) != 1:
        raise KilnError(f"expected one .gguf in {directory}, found {[f.name for f in found]}")
    return found[0]


def host_tool(ctx: "StageContext", name: str) -> Path:
    return ctx.inputs[HOST_BUILD] / "bin" / name


def gguf_name(model_name: str, gguf_type: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-._" else "-" for c in model_name)
    return f"{safe}-{gguf_type}.gguf"


def gguf_types(recipe: "Recipe") -> list[str]:
    """The scheme's quant types, de-duplicated, in order (the first is the bundle's default)."""
    return list(dict.fromkeys(recipe.scheme.gguf_types))


class LlamacppStage(Stage):
    """Base of the seed 001 stages: they apply to recipes whose target runs llama.cpp."""

    @classmethod
    def applies(cls, recipe: "Recipe") -> bool:
        return recipe.target.runtime == "llama.cpp"


class PerQuantType(LlamacppStage):
    """A llama.cpp stage that runs once per quant type of the scheme."""

    @classmethod
    def variants(cls, recipe: "Recipe") -> list[str]:
        return gguf_types(recipe)
