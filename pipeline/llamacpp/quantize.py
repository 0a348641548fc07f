"""llamacpp.quantize: one llama.cpp quant type per variant (the scheme's `gguf_types`),
with the host build of llama-quantize; optionally with an importance matrix."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from pipeline.engine.proc import run_tool, threads
from pipeline.engine.stage import StageContext, Strict
from pipeline.llamacpp.common import (
    CONVERT,
    HOST_BUILD,
    IMATRIX,
    QUANTIZE,
    PerQuantType,
    gguf_in,
    gguf_name,
    host_tool,
    shipped_types,
)

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe


class QuantizeParams(Strict):
    ship: Literal["all", "primary"] = Field(
        "all", description="Quant types the bundle carries: every type of the scheme, or its first (primary) only "
        "(the others are still built, measured and compared in the report). Not part of any key.")


class LlamacppQuantize(PerQuantType):
    """Float GGUF → quantized GGUF (types and imatrix come from the scheme)."""

    name = QUANTIZE
    version = 2  # 2: the imatrix named without the store's path
    Params = QuantizeParams

    @classmethod
    def inputs(cls, recipe: Recipe, variant: str) -> list[str]:
        return [CONVERT, HOST_BUILD] + ([IMATRIX] if recipe.scheme.gguf_imatrix else [])

    @classmethod
    def params(cls, recipe: Recipe, variant: str) -> dict[str, Any]:  # `ship` only chooses what the bundle takes
        return {"type": variant, "imatrix": recipe.scheme.gguf_imatrix, "file": gguf_name(recipe.model.name, variant)}

    @classmethod
    def ships(cls, recipe: Recipe, variant: str) -> str | None:
        return "models" if variant in shipped_types(recipe) else None

    def run(self, ctx: StageContext) -> None:
        src = gguf_in(ctx.inputs[CONVERT])
        out = ctx.out / ctx.params["file"]
        # llama-quantize writes the imatrix's file name into the GGUF's metadata: a bare name, run
        # from the imatrix's folder, keeps the store's path out of the shipped model's bytes
        imatrix = ["--imatrix", "imatrix.gguf"] if ctx.params["imatrix"] else []
        run_tool([host_tool(ctx, "llama-quantize"), *imatrix, src, out, ctx.params["type"], threads()],
                 cwd=ctx.inputs[IMATRIX] if ctx.params["imatrix"] else None)
        ctx.log.info(f"{out.name}: {out.stat().st_size / 1e6:.1f} MB (from {src.name}, {src.stat().st_size / 1e6:.1f} MB)")
