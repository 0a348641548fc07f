"""llamacpp.convert: the model stage's HF checkpoint → one float GGUF, with the tree's own
convert_hf_to_gguf.py and gguf-py (PyPI's gguf lacks what this converter needs)."""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from pipeline.engine.proc import run_tool
from pipeline.engine.stage import NoParams, StageContext
from pipeline.llamacpp.common import CONVERT, SOURCE, LlamacppStage, gguf_name
from pipeline.recipe.size import peak_estimate

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe


class LlamacppConvert(LlamacppStage):
    """HF → GGUF; the outtype comes from the scheme (`gguf_outtype`)."""

    name = CONVERT
    version = 1
    Params = NoParams
    tools = ("python", "torch", "transformers", "numpy", "tokenizers", "sentencepiece")

    requires = ("model", SOURCE)

    @classmethod
    def peak_memory(cls, recipe: Recipe, variant: str = "") -> int | None:
        return peak_estimate(recipe, CONVERT)

    @classmethod
    def params(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        return {"outtype": recipe.scheme.gguf_outtype, "file": gguf_name(recipe.model.name, recipe.scheme.gguf_outtype.upper())}

    def run(self, ctx: StageContext) -> None:
        tree = ctx.inputs[SOURCE]
        out = ctx.out / ctx.params["file"]
        run_tool([sys.executable, tree / "convert_hf_to_gguf.py", ctx.inputs["model"],
                  "--outtype", ctx.params["outtype"], "--outfile", out],
                 env={"PYTHONPATH": str(tree / "gguf-py"), "PYTHONDONTWRITEBYTECODE": "1",
                      "HF_HUB_OFFLINE": "1"})
        ctx.log.info(f"{out.name}: {out.stat().st_size / 1e6:.1f} MB")
