"""eval.perplexity: llama-perplexity (host build) of the float GGUF and of every quant
type on the held-out evaluation text; one variant each (`float`, `Q4_K_M`, ...)."""
from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from ..errors import KilnError
from ..llamacpp import HOST_BUILD, LlamacppStage, float_gguf_node, gguf_in, gguf_types, host_tool, quant_node
from ..proc import run_tool, threads
from ..stage import StageContext

if TYPE_CHECKING:
    from ..recipe import Recipe

FLOAT = "float"
_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


class PerplexityParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    ctx_size: int = Field(512, ge=64, description="Tokens per window (-c); windows do not overlap.")
    chunks: int = Field(24, ge=1, description="Windows of evaluation text scored (--chunks).")


def parse_ppl(output: str) -> tuple[float, float]:
    m = _FINAL.search(output)
    if not m:
        raise KilnError("llama-perplexity printed no 'Final estimate: PPL = ...' line")
    return float(m.group(1)), float(m.group(2))


class EvalPerplexity(LlamacppStage):
    """Perplexity of each GGUF variant on held-out text."""

    name = "eval.perplexity"
    version = 1
    Params = PerplexityParams

    @classmethod
    def variants(cls, recipe: "Recipe") -> list[str]:
        return [FLOAT] + gguf_types(recipe)

    @classmethod
    def inputs(cls, recipe: "Recipe", variant: str) -> list[str]:
        model = float_gguf_node() if variant == FLOAT else quant_node(variant)
        return [model, HOST_BUILD, "text"]

    @classmethod
    def params(cls, recipe: "Recipe", variant: str) -> dict[str, Any]:
        return {**recipe.stage_params(cls.name), "type": recipe.scheme.gguf_outtype.upper() if variant == FLOAT else variant}

    def run(self, ctx: StageContext) -> None:
        p = ctx.params
        model_node = next(n for n in ctx.inputs if n.startswith(("gguf.convert", "gguf.quantize")))
        model = gguf_in(ctx.inputs[model_node])
        out = run_tool([host_tool(ctx, "llama-perplexity"), "-m", model, "-f", ctx.inputs["text"] / "evaluation.txt",
                        "-c", p["ctx_size"], "--chunks", p["chunks"], "-t", threads()], capture=True)
        print(out.stderr[-3000:] + out.stdout[-2000:])
        ppl, err = parse_ppl(out.stdout + out.stderr)
        result = {"variant": ctx.variant, "type": p["type"], "file": model.name, "size_bytes": model.stat().st_size,
                  "ppl": ppl, "ppl_err": err, "ctx_size": p["ctx_size"], "chunks": p["chunks"]}
        (ctx.out / "perplexity.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        ctx.log.info(f"{model.name}: PPL {ppl:.4f} ± {err:.4f}")
