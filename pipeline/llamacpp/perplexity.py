"""llamacpp.perplexity: llama-perplexity (host build) of the float GGUF and of every quant
type on the held-out evaluation text; one variant each (`float`, `Q4_K_M`, ...)."""
from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from pydantic import Field

from pipeline.engine.errors import KilnError
from pipeline.engine.proc import run_tool, threads
from pipeline.engine.stage import StageContext, Strict
from pipeline.llamacpp.common import (
    CONVERT,
    FLOAT,
    HOST_BUILD,
    PERPLEXITY,
    QUANTIZE,
    LlamacppStage,
    gguf_in,
    host_tool,
    perplexity_variants,
    quant_node,
)

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe

_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


class PerplexityParams(Strict):
    ctx_size: int = Field(512, ge=64, description="Tokens per window (-c); windows do not overlap.")
    chunks: int = Field(24, ge=1, description="Windows of evaluation text scored (--chunks).")


def parse_ppl(output: str) -> tuple[float, float]:
    m = _FINAL.search(output)
    if not m:
        raise KilnError("llama-perplexity printed no 'Final estimate: PPL = ...' line")
    return float(m.group(1)), float(m.group(2))


class LlamacppPerplexity(LlamacppStage):
    """Perplexity of each GGUF variant on held-out text."""

    name = PERPLEXITY
    version = 1
    Params = PerplexityParams

    @classmethod
    def variants(cls, recipe: Recipe) -> list[str]:
        return perplexity_variants(recipe)

    @classmethod
    def inputs(cls, recipe: Recipe, variant: str) -> list[str]:
        model = CONVERT if variant == FLOAT else quant_node(variant)
        return [model, HOST_BUILD, "text"]

    @classmethod
    def params(cls, recipe: Recipe, variant: str) -> dict[str, Any]:
        return {**recipe.stage_params(cls.name), "type": recipe.scheme.gguf_outtype.upper() if variant == FLOAT else variant}

    def run(self, ctx: StageContext) -> None:
        p = ctx.params
        model_node = next(n for n in ctx.inputs if n.startswith((CONVERT, QUANTIZE)))
        model = gguf_in(ctx.inputs[model_node])
        out = run_tool([host_tool(ctx, "llama-perplexity"), "-m", model, "-f", ctx.inputs["text"] / "evaluation.txt",
                        "-c", p["ctx_size"], "--chunks", p["chunks"], "-t", threads()], capture=True, echo=True)
        ppl, err = parse_ppl(out.stdout)  # llama-perplexity's own progress (ETA, [n]ppl per window) went to the log
        result = {"variant": ctx.variant, "type": p["type"], "file": model.name, "size_bytes": model.stat().st_size,
                  "ppl": ppl, "ppl_err": err, "ctx_size": p["ctx_size"], "chunks": p["chunks"]}
        (ctx.out / "perplexity.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        ctx.log.info(f"{model.name}: PPL {ppl:.4f} ± {err:.4f}")
