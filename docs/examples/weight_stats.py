"""example.weight_stats: the stage docs/adding-a-stage.md walks through — the largest tensors of
the model stage's checkpoint, with shape, dtype and RMS.

Not in pipeline/registry.py (a real stage would be `pipeline/<backend>/<verb>.py` plus one line
there); tests/cli/test_docs.py hands it to the recipe loader beside the registered stages, plans
it and builds it, so this page cannot go stale.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pydantic import Field

from pipeline.engine.stage import Stage, StageContext, Strict

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe


class WeightStatsParams(Strict):
    """The recipe's `stages.example.weight_stats` section: validated, documented, part of the key."""

    top: int = Field(5, ge=1, le=1000, description="How many of the largest tensors to list.")


class WeightStats(Stage):
    """Largest tensors of the checkpoint (name, shape, dtype, RMS)."""

    name = "example.weight_stats"  # <backend>.<verb>; the node id adds @variant when there are several
    version = 1                    # bump when the output changes for the same inputs
    Params = WeightStatsParams
    runtimes = ()                  # the target runtimes it serves; () = every one
    tools = ("python", "safetensors", "torch")  # their versions enter the key
    resource = "light"             # "heavy": takes one of [tool.kiln].heavy_slots
    requires = ("model",)          # node ids whose outputs `run` reads as ctx.inputs[...]

    @classmethod
    def params(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        # default: the recipe's section; add whatever else of the recipe changes the output
        return {**recipe.stage_params(cls.name), "model": recipe.model.name}

    def run(self, ctx: StageContext) -> None:
        # a child process: heavy imports here, outputs to ctx.out, scratch files to ctx.tmp
        from safetensors import safe_open

        from pipeline.engine.progress import progress

        rows = []
        for path in sorted(ctx.inputs["model"].glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for name in progress(sorted(f.keys()), path.name, "tensor"):
                    t = f.get_tensor(name)
                    rows.append({"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                                 "numel": t.numel(), "rms": round(float(t.float().pow(2).mean().sqrt()), 6)})
        rows.sort(key=lambda r: (-r["numel"], r["name"]))
        top = rows[: ctx.params["top"]]
        (ctx.out / "weights.json").write_text(json.dumps({"model": ctx.params["model"], "largest": top}, indent=2) + "\n")
        ctx.log.info(f"{len(rows)} tensors; largest {top[0]['name']} {top[0]['shape']}")
