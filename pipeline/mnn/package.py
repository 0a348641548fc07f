"""mnn.package: the phone-side files of an MNN bundle — run.sh (adb push, llm_demo chat/prompt,
or MNN's Python engine on any machine) and a README with the expected answer and the host check —
rendered from templates/mnn/. Runtime settings stay in config.json (mnn.config), so tweaking them
does not rerun this stage."""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from pipeline.engine.stage import NoParams, Stage, StageContext
from pipeline.engine.templating import ShipsTemplates
from pipeline.mnn.runtime import RUNTIME, VERIFY, export_params

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe


class MnnPackage(ShipsTemplates, Stage):
    """run.sh and README.md for the phone."""

    name = "mnn.package"
    version = 1
    Params = NoParams
    per_recipe = True
    tools = ("mnn", "llmexport")
    templates_used = ("mnn/run.sh.j2", "mnn/README.md.j2")

    runtimes = (RUNTIME,)

    requires = (VERIFY,)

    @classmethod
    def params(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        export = export_params(recipe)
        block = f"block {export['quant_block']}" if export["quant_block"] else "per-channel"
        return {"recipe_description": recipe.spec.description, "model": recipe.model.name,
                "target": recipe.target.model_dump(mode="json"), "device_dir": f"/data/local/tmp/{recipe.name}",
                "quant": f"{export['quant_bit']}-bit weights, {block}, {'symmetric' if export['sym'] else 'asymmetric'}",
                "chat": recipe.stage_params(VERIFY)["chat"]}

    def run(self, ctx: StageContext) -> None:
        from pipeline.engine.templating import render

        verify = ctx.inputs[VERIFY]
        result = json.loads((verify / "verify.json").read_text())
        values = dict(ctx.params, recipe=ctx.recipe_name, mnn_version=ctx.tools["mnn"],
                      llmexport_version=ctx.tools["llmexport"], answer=result["chat"]["answer"].strip(),
                      label=result["label"], report_md=(verify / "report.md").read_text())
        run_sh = ctx.out / "run.sh"
        run_sh.write_text(render("mnn/run.sh.j2", **values))
        os.chmod(run_sh, 0o755)
        (ctx.out / "README.md").write_text(render("mnn/README.md.j2", **values))
