"""llamacpp.imatrix: importance matrix of the float GGUF on the calibration text (llama-imatrix),
used by llamacpp.quantize when the scheme sets `gguf_imatrix: true`."""
from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from pipeline.engine.proc import run_tool, threads
from pipeline.engine.stage import StageContext, Strict
from pipeline.llamacpp.common import CONVERT, HOST_BUILD, IMATRIX, LlamacppStage, gguf_in, host_tool

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe


class ImatrixParams(Strict):
    ctx_size: int = Field(512, ge=64, description="Tokens per chunk (-c).")
    chunks: int = Field(32, ge=1, description="Chunks of calibration text to process (--chunks).")


class LlamacppImatrix(LlamacppStage):
    """Importance matrix for quantization."""

    name = IMATRIX
    version = 2  # 2: the calibration file named without the store's path
    Params = ImatrixParams

    @classmethod
    def applies(cls, recipe: Recipe) -> bool:
        return recipe.scheme.gguf_imatrix

    requires = (CONVERT, HOST_BUILD, "text")

    def run(self, ctx: StageContext) -> None:
        p = ctx.params
        # llama-imatrix records the file name it read in the imatrix, and llama-quantize copies it
        # into the quantized GGUF's metadata: a bare name run from the text's folder keeps the
        # store's path (where the store is) out of both files' bytes.
        run_tool([host_tool(ctx, "llama-imatrix"), "-m", gguf_in(ctx.inputs[CONVERT]),
                  "-f", "calibration.txt", "-o", ctx.out / "imatrix.gguf",
                  "-c", p["ctx_size"], "--chunks", p["chunks"], "-t", threads()], cwd=ctx.inputs["text"])
