"""qnn.perplexity: the quantized graph as onnxruntime runs it on CPU (qnn.quantize's QDQ ONNX of
the widest AR graph, stepped through each window with its KV cache the way Genie feeds the
device) on the float reference's windows: the shared perplexity protocol (the `reference`
stage), KL divergence against the float model included. Size on disk is the compiled context
binaries' (what ships)."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pipeline.engine.errors import KilnError
from pipeline.engine.stage import NoParams, StageContext
from pipeline.qnn.common import COMPILE, PERPLEXITY, QUANTIZE, GraphStage

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe

class QnnPerplexity(GraphStage):
    """Perplexity of the QDQ graph (onnxruntime, CPU) on the float reference's tokens."""

    name = PERPLEXITY
    version = 1
    Params = NoParams
    requires = ("model", QUANTIZE, COMPILE, "reference")

    @classmethod
    def params(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        window, context = recipe.spec.eval.perplexity.window, recipe.spec.context_length
        if window > context:
            raise KilnError(f"{recipe.where('eval', 'perplexity', 'window')}: eval.perplexity.window {window} is longer "
                            f"than the graphs' context_length {context}")
        s = recipe.scheme
        return {"context_length": context,
                "scheme": f"W{s.weights.bits}A{s.activations.bits} KV{s.kv_cache.bits} {s.algorithm}"}

    def run(self, ctx: StageContext) -> None:
        from pipeline.evaluation.logprobs import score_windows
        from pipeline.evaluation.quality import quality_row, write_quality
        from pipeline.generic.layers import meta_model
        from pipeline.qnn.adapted_llama import io_names, run_steps
        from pipeline.qnn.onnx_check import ort_session, ort_step

        quantized = ctx.inputs[QUANTIZE]
        report = json.loads((quantized / "quantize.json").read_text())
        main = max(report["graphs"], key=lambda g: g["ar"])
        model = meta_model(ctx.inputs["model"])
        names_in, names_out = io_names(model.config.num_hidden_layers)
        step = ort_step(ort_session(quantized / main["qdq"]), names_in, names_out)
        context = ctx.params["context_length"]

        def logits_of(ids: list[int], first: int, n: int) -> Any:
            return run_steps(step, model, ids[:first + n], main["ar"], context)[first:first + n].numpy()

        stats, summary = score_windows(ctx.inputs["reference"], logits_of, "QDQ graph perplexity")
        binaries = sorted((ctx.inputs[COMPILE] / "shared").glob("*.bin"))  # what ships (unshared/ feeds the simulator)
        label = f"{ctx.params['scheme']} QDQ ONNX, onnxruntime CPU (AR-{main['ar']}, context {context})"
        write_quality(ctx.out, quality_row("qnn", "qdq", label, ", ".join(b.name for b in binaries),
                                           sum(b.stat().st_size for b in binaries), stats, summary))
        ctx.log.info(f"QDQ graph {main['qdq']}: PPL {stats['ppl']:.4f}, KLD vs float {stats['kld']:.5f}, "
                     f"same top-1 {stats['same_top_pct']:.2f}%")
