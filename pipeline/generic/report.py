"""report: the recipe's evaluation as a static HTML page (`report/index.html`, shipped in the
bundle's report/): what was built (model, target, scheme, the stage graph drawn by Graphviz),
the quality table and size-vs-perplexity plot on the shared protocol, task accuracy against the
token budget per prompt variant, and accuracy at equal latency from the device speeds the
recipe states (`eval.latency`, with their source). Everything on it is deterministic: the same
inputs give the same bytes. What changes with every build (when, stage costs, device runs) goes
to `build.html` beside it in the workspace, written after the build (pipeline/cli/build_page.py)."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pipeline.engine.stage import NoParams, Stage, StageContext, node_id, recipe_nodes
from pipeline.evaluation import EVALUATED_RUNTIMES

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe

PAGE = "index.html"


def _scored(recipe: Recipe) -> list[str]:
    return [node_id(c.name, v) for c, v in recipe_nodes(recipe) if c.name.endswith((".perplexity", ".tasks"))]


class Report(Stage):
    """The recipe's evaluation page (report/index.html): quality, task accuracy, latency curves, stage graph."""

    name = "report"
    version = 3  # 2: task tables in budget order (not tasks.json's text-sorted keys); 3: summary rows headed, no "-0" KLD
    Params = NoParams
    tools = ("python", "matplotlib", "deb:graphviz")
    runtimes = EVALUATED_RUNTIMES
    per_recipe = True

    @classmethod
    def inputs(cls, recipe: Recipe, variant: str = "") -> list[str]:
        return ["reference", *_scored(recipe)]

    @classmethod
    def params(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        latency = recipe.spec.eval.latency
        graph = [[node_id(c.name, v), sorted(c.inputs(recipe, v))] for c, v in recipe_nodes(recipe)]
        return {"model": recipe.model.name, "description": recipe.spec.description, "target": recipe.target.name,
                "target_description": recipe.target.description, "scheme": recipe.scheme.name,
                "context_length": recipe.spec.context_length, "graph": graph,
                "latency": latency.model_dump(mode="json") if latency else None}

    @classmethod
    def ships(cls, recipe: Recipe, variant: str = "") -> str | None:
        return "report"

    def run(self, ctx: StageContext) -> None:
        from pipeline.evaluation.page import write_report

        write_report(ctx)
        figures = json.loads((ctx.out / "evaluation.json").read_text())["figures"]
        ctx.log.info(f"report: {PAGE} with {len(figures)} figures ({', '.join(figures)})")
