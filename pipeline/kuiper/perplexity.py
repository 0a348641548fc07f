"""kuiper.perplexity: the exported file read back by Kiln's reader (pipeline/kuiper/format.py)
and run in its numpy forward pass on the float reference's windows: the shared perplexity
protocol (the `reference` stage), KL divergence against the float model included."""
from __future__ import annotations

import json

from pipeline.engine.stage import NoParams, Stage, StageContext
from pipeline.kuiper.common import EXPORT, MODEL_FILE, PERPLEXITY, RUNTIME


class KuiperPerplexity(Stage):
    """Perplexity of the int8 file, as read, on the float reference's tokens."""

    name = PERPLEXITY
    version = 1
    Params = NoParams
    tools = ("python", "numpy")
    resource = "heavy"
    runtimes = (RUNTIME,)
    requires = (EXPORT, "reference")

    def run(self, ctx: StageContext) -> None:
        from pipeline.evaluation.logprobs import score_windows
        from pipeline.evaluation.quality import quality_row, write_quality
        from pipeline.kuiper.format import forward, read_model

        export = ctx.inputs[EXPORT]
        meta = json.loads((export / "kuiper.json").read_text())
        model = read_model(export / MODEL_FILE)
        stats, summary = score_windows(
            ctx.inputs["reference"],
            lambda ids, first, n: forward(model, ids, meta["rope_theta"], meta["rms_norm_eps"])[first:first + n],
            "kuiper perplexity")
        label = f"int8 group {model.header.group_size}, Kiln's numpy reader of the file (host)"
        write_quality(ctx.out, quality_row("kuiper", "int8", label, MODEL_FILE, (export / MODEL_FILE).stat().st_size,
                                           stats, summary))
        ctx.log.info(f"{MODEL_FILE}: PPL {stats['ppl']:.4f}, KLD vs float {stats['kld']:.5f}, "
                     f"same top-1 {stats['same_top_pct']:.2f}%")
