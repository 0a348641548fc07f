"""mnn.perplexity: the export run by MNN's LLM engine (pymnn, host CPU) on the float reference's
windows: the shared perplexity protocol (the `reference` stage), KL divergence against the float
model included. Each window's first half is one prefill; the scored positions then advance one
known token at a time on the KV cache, as the engine decodes on a device."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.engine.stage import NoParams, Stage, StageContext
from pipeline.engine.templating import TEMPLATES
from pipeline.mnn.runtime import CONFIG_TEMPLATE, EXPORT, EXPORT_FILES, PERPLEXITY, RUNTIME, numeric_settings

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe


class MnnPerplexity(Stage):
    """Perplexity of the MNN export on the float reference's tokens."""

    name = PERPLEXITY
    version = 1
    Params = NoParams
    tools = ("python", "mnn", "numpy")
    resource = "heavy"
    runtimes = (RUNTIME,)
    requires = (EXPORT, "reference")

    @classmethod
    def params(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        return {"runtime": numeric_settings(recipe)}

    @classmethod
    def sources(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        return {CONFIG_TEMPLATE: TEMPLATES / CONFIG_TEMPLATE}

    def run(self, ctx: StageContext) -> None:
        from pipeline.evaluation.logprobs import score_windows
        from pipeline.evaluation.quality import quality_row, write_quality
        from pipeline.mnn.runtime import greedy_host_config, loaded

        export, runtime = ctx.inputs[EXPORT], ctx.params["runtime"]
        with loaded(export, greedy_host_config(runtime), ctx.tmp / "run") as llm:
            stats, summary = score_windows(ctx.inputs["reference"], llm.teacher_forced, "MNN perplexity")
        size = sum((export / EXPORT_FILES[k]).stat().st_size for k in ("llm_model", "llm_weight"))
        label = (f"MNN engine, host CPU (precision {runtime['precision']}, memory {runtime['memory']}, "
                 f"quant_qkv {runtime['quant_qkv']})")
        write_quality(ctx.out, quality_row("mnn", "mnn", label, EXPORT_FILES["llm_weight"], size, stats, summary))
        ctx.log.info(f"MNN export: PPL {stats['ppl']:.4f}, KLD vs float {stats['kld']:.5f}, "
                     f"same top-1 {stats['same_top_pct']:.2f}%")
