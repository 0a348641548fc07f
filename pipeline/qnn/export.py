"""qnn.export: the adapted Llama (pipeline/qnn/adapted_llama.py) → one ONNX graph per AR length
at the recipe's context length, with external weight data, checked in onnxruntime against
the HF model on real text (max |Δlogits|, top-1 agreement; the stage fails above tolerance),
plus test vectors (.npz: first step's inputs and outputs) for later stages."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pydantic import Field

from pipeline.engine.errors import KilnError
from pipeline.engine.stage import StageContext, Strict
from pipeline.qnn.common import EXPORT, GraphStage, ar_variant
from pipeline.recipe.size import peak_estimate

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe


class QnnExportParams(Strict):
    opset: int = Field(17, ge=13, description="ONNX opset (legacy TorchScript exporter).")
    check_tokens: int = Field(256, ge=1, description="Tokens of evaluation text compared with the HF model per graph.")
    max_abs_logit_diff: float = Field(5e-3, gt=0, description="Fail when onnxruntime's logits differ more than this.")
    min_top1_agreement: float = Field(0.99, ge=0, le=1, description="Fail when fewer argmax tokens agree with HF.")


class QnnExport(GraphStage):
    """Adapted-model ONNX graphs (AR-128, AR-1, ...) + test vectors."""

    name = EXPORT
    version = 2  # 2: mask value -100
    Params = QnnExportParams

    @classmethod
    def variants(cls, recipe: Recipe) -> list[str]:
        return [ar_variant(a) for a in dict.fromkeys(recipe.spec.ar_lengths)]

    requires = ("model", "text")

    @classmethod
    def peak_memory(cls, recipe: Recipe, variant: str = "") -> int | None:
        return peak_estimate(recipe, EXPORT)

    @classmethod
    def params(cls, recipe: Recipe, variant: str) -> dict[str, Any]:
        ar = int(variant.removeprefix("ar"))
        if ar >= recipe.spec.context_length:
            raise KilnError(f"{recipe.where('ar_lengths')}: ar_lengths: AR {ar} must be below context_length "
                            f"{recipe.spec.context_length}")
        return {**recipe.stage_params(cls.name), "ar": ar, "context_length": recipe.spec.context_length,
                "graph": f"{recipe.model.name}_ar{ar}_cl{recipe.spec.context_length}"}

    def run(self, ctx: StageContext) -> None:
        import numpy as np
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pipeline.qnn.adapted_llama import AdaptedLlama, io_names, step_inputs
        from pipeline.qnn.onnx_check import compare_with_hf
        from pipeline.qnn.onnx_files import gather_external_data

        p = ctx.params
        ar, context = p["ar"], p["context_length"]
        hf = AutoModelForCausalLM.from_pretrained(ctx.inputs["model"], dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(ctx.inputs["model"])
        model = AdaptedLlama(hf).eval()
        names_in, names_out = io_names(model.d.layers)
        example = step_inputs(hf, [tokenizer.bos_token_id or 0], 0, ar, context)
        onnx_path = ctx.out / f"{p['graph']}.onnx"
        tmp = ctx.tmp / "export.onnx"  # torch writes one file per weight beside it
        ctx.log.info(f"exporting {p['graph']} (opset {p['opset']}, {len(names_in)} inputs)")
        with torch.no_grad():
            torch.onnx.export(model, example, str(tmp), input_names=names_in, output_names=names_out,
                              opset_version=p["opset"], dynamo=False, do_constant_folding=True)
        del model  # shares its weights with `hf`; nothing else of it is needed
        gather_external_data(tmp, onnx_path, p["graph"])

        text = (ctx.inputs["text"] / "evaluation.txt").read_text()
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: min(p["check_tokens"], context - 1)]
        bos = tokenizer.bos_token_id
        ids = ([bos] if bos is not None else []) + ids[: min(p["check_tokens"], context - 1) - (bos is not None)]
        report, vectors = compare_with_hf(hf, onnx_path, names_in, names_out, ids, ar, context, free_hf=True)
        np.savez_compressed(ctx.out / "test_vectors.npz", **vectors)
        report.update(graph=p["graph"], ar=ar, context_length=context, inputs=names_in[:4] + ["past_*_in"],
                      outputs=["logits", "past_*_out"])
        (ctx.out / "export.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        ctx.log.info(f"onnxruntime vs HF on {report['tokens']} tokens: max |Δlogits| {report['max_abs_logit_diff']:.3g}, "
                     f"top-1 agreement {report['top1_agreement']:.4f}")
        if report["max_abs_logit_diff"] > p["max_abs_logit_diff"] or report["top1_agreement"] < p["min_top1_agreement"]:
            raise KilnError(f"{p['graph']}: onnxruntime differs from HF beyond tolerance: {report}")
