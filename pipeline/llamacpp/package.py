"""llamacpp.package: the board-side files of the bundle — `run.sh` (the RK3568 write-up's
completion-mode command; under qemu when run on a non-Arm machine) and a README
with the expected output — rendered from templates/llamacpp/."""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from pipeline.engine.stage import NoParams, StageContext
from pipeline.engine.templating import ShipsTemplates
from pipeline.llamacpp.common import REPORT, LlamacppStage, gguf_name, shipped_types, verify_params

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe


class LlamacppPackage(ShipsTemplates, LlamacppStage):
    """run.sh and README.md for the board."""

    name = "llamacpp.package"
    version = 1
    templates_used = ("llamacpp/run.sh.j2", "llamacpp/README.md.j2")
    Params = NoParams
    per_recipe = True

    @classmethod
    def applies(cls, recipe: Recipe) -> bool:
        return bool(recipe.scheme.gguf_types)

    requires = (REPORT,)

    @classmethod
    def params(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        primary = recipe.scheme.gguf_types[0]
        return {"recipe_description": recipe.spec.description, "model": recipe.model.name,
                "target": recipe.target.model_dump(mode="json"), "primary": primary,
                "models": [gguf_name(recipe.model.name, t) for t in shipped_types(recipe)],
                "verify": {**verify_params(recipe, primary), "ctx": recipe.spec.context_length}}  # as llamacpp.verify runs

    def run(self, ctx: StageContext) -> None:
        from pipeline.engine.templating import render

        p = ctx.params
        report = json.loads((ctx.inputs[REPORT] / "report.json").read_text())
        primary = next(r for r in report["verify"] if r["type"] == p["primary"])
        values = dict(p, recipe=ctx.recipe_name, expected=primary["completion"].strip(),
                      report_md=(ctx.inputs[REPORT] / "report.md").read_text(), label=primary["label"])
        run_sh = ctx.out / "run.sh"
        run_sh.write_text(render("llamacpp/run.sh.j2", **values))
        os.chmod(run_sh, 0o755)
        (ctx.out / "README.md").write_text(render("llamacpp/README.md.j2", **values))
