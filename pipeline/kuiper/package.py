"""kuiper.package: the README of a Kuiper int8 bundle — the file's layout with this model's header
values, how KuiperLLama loads it and what to check first (RoPE theta, norm epsilon, tokenizer,
which the format does not carry), and the read-back results — from templates/kuiper/."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pipeline.engine.stage import NoParams, Stage, StageContext
from pipeline.engine.templating import ShipsTemplates
from pipeline.kuiper.common import EXPORT, RUNTIME, TOKENIZER_FILES, VERIFY

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe


class KuiperPackage(ShipsTemplates, Stage):
    """README.md for the int8 bundle."""

    name = "kuiper.package"
    version = 1
    Params = NoParams
    per_recipe = True
    templates_used = ("kuiper/README.md.j2",)

    runtimes = (RUNTIME,)

    requires = (EXPORT, VERIFY)

    @classmethod
    def params(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        return {"recipe_description": recipe.spec.description, "model": recipe.model.name}

    def run(self, ctx: StageContext) -> None:
        from pipeline.engine.templating import render
        from pipeline.kuiper.format import Header

        export, verify = ctx.inputs[EXPORT], ctx.inputs[VERIFY]
        meta = json.loads((export / "kuiper.json").read_text())
        header = Header(**{k: v for k, v in meta["header"].items() if k != "shared_classifier"})
        (ctx.out / "README.md").write_text(render(
            "kuiper/README.md.j2", **{**ctx.params, "recipe": ctx.recipe_name}, meta=meta, h=header,
            tokenizer_files=[n for n in TOKENIZER_FILES if (export / n).exists()],
            report_md=(verify / "report.md").read_text()))
