"""gguf.imatrix: importance matrix of the float GGUF on the calibration text (llama-imatrix),
used by gguf.quantize when the scheme sets `gguf_imatrix: true`."""
from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from ..llamacpp import HOST_BUILD, LlamacppStage, float_gguf_node, gguf_in, host_tool
from ..proc import run_tool, threads
from ..stage import StageContext

if TYPE_CHECKING:
    from ..recipe import Recipe


class ImatrixParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    ctx_size: int = Field(512, ge=64, description="Tokens per chunk (-c).")
    chunks: int = Field(32, ge=1, description="Chunks of calibration text to process (--chunks).")


class GgufImatrix(LlamacppStage):
    """Importance matrix for quantization."""

    name = "gguf.imatrix"
    version = 1
    Params = ImatrixParams

    @classmethod
    def applies(cls, recipe: "Recipe") -> bool:
        return super().applies(recipe) and recipe.scheme.gguf_imatrix

    @classmethod
    def inputs(cls, recipe: "Recipe", variant: str = "") -> list[str]:
        return [float_gguf_node(), HOST_BUILD, "text"]

    def run(self, ctx: StageContext) -> None:
        p = ctx.params
        run_tool([host_tool(ctx, "llama-imatrix"), "-m", gguf_in(ctx.inputs[float_gguf_node()]),
                  "-f", ctx.inputs["text"] / "calibration.txt", "-o", ctx.out / "imatrix.gguf",
                  "-c", p["ctx_size"], "--chunks", p["chunks"], "-t", threads()])
