"""kuiper.verify: read kuiper.export's file back with pipeline/kuiper/format.py's reader and run its
numpy forward pass on a prompt, against the HF model two ways:

- layout: HF with its weights group-quantized the same way (in HF's own row order: groups lie
  within rows, so the Q/K row permutation does not change them) must give the reader's logits
  within `max_abs_diff`: proves header, tensor order, scales, permutation and RoPE convention;
- quality: the float HF model vs the reader (top-1 agreement, cosine), what int8 costs.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pydantic import Field

from pipeline.engine.errors import KilnError
from pipeline.engine.fields import Prompt
from pipeline.engine.stage import Stage, StageContext, Strict
from pipeline.kuiper.common import EXPORT, MODEL_FILE, RUNTIME, VERIFY

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe


class KuiperVerifyParams(Strict):
    prompt: Prompt = Field("The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
                        description="Text run through both (BOS added as the model's tokenizer does).")
    max_abs_diff: float = Field(2e-3, gt=0, description="Layout check: most |Δlogit| between the reader and HF "
                                "with the same group-quantized weights (float32 both; differences are rounding).")
    min_top1: float = Field(0.9, ge=0, le=1, description="Quality check: least top-1 agreement with the float model.")


class KuiperVerify(Stage):
    """The export read back and run in numpy vs the HF model (same int8 weights, and float)."""

    name = VERIFY
    version = 2  # 2: no recipe name in the report (entries are shared between recipes)
    Params = KuiperVerifyParams
    tools = ("python", "numpy", "torch", "transformers")
    resource = "heavy"
    runtimes = (RUNTIME,)

    requires = ("model", EXPORT)

    @classmethod
    def ships(cls, recipe: Recipe, variant: str = "") -> str | None:
        return "report"

    def run(self, ctx: StageContext) -> None:
        import numpy as np
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pipeline.kuiper.format import dequantize_q8, forward, quantize_q8, read_model

        p, export = ctx.params, ctx.inputs[EXPORT]
        meta = json.loads((export / "kuiper.json").read_text())
        model = read_model(export / MODEL_FILE)
        ids = AutoTokenizer.from_pretrained(ctx.inputs["model"])(p["prompt"])["input_ids"]
        ours = forward(model, ids, meta["rope_theta"], meta["rms_norm_eps"])
        hf = AutoModelForCausalLM.from_pretrained(ctx.inputs["model"], dtype=torch.float32).eval()
        with torch.no_grad():
            float_logits = hf(torch.tensor([ids])).logits[0].numpy()
            group = model.header.group_size
            for name, param in hf.named_parameters():
                if name.startswith("model.layers.") and name.endswith("proj.weight") or \
                        (name == "lm_head.weight" and not model.header.shared_classifier):
                    w = param.numpy()
                    param.copy_(torch.from_numpy(dequantize_q8(*quantize_q8(w, group), group)))
            quant_logits = hf(torch.tensor([ids])).logits[0].numpy()
        diff = float(np.abs(ours - quant_logits).max())
        cos = (ours * float_logits).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(float_logits, axis=-1))
        result = {
            "label": "numpy reference forward of the file as read (host)", "tokens": len(ids),
            "header": meta["header"], "size_bytes": meta["size_bytes"],
            "layout": {"max_abs_diff_vs_hf_same_int8": diff, "logit_scale": float(np.abs(quant_logits).max()),
                       "top1_agreement": float((ours.argmax(-1) == quant_logits.argmax(-1)).mean())},
            "quality": {"top1_agreement_vs_float": float((ours.argmax(-1) == float_logits.argmax(-1)).mean()),
                        "cosine_mean_vs_float": float(cos.mean()), "cosine_min_vs_float": float(cos.min())},
        }
        (ctx.out / "verify.json").write_text(json.dumps(result, indent=2) + "\n")
        (ctx.out / "report.md").write_text(report_md(result))
        print((ctx.out / "report.md").read_text())
        problems = []
        if diff > p["max_abs_diff"]:
            problems.append(f"reader vs HF with the same int8 weights: max |Δlogit| {diff:.2e} > {p['max_abs_diff']:.0e} "
                            "(the file's layout is not what the reader expects)")
        if result["quality"]["top1_agreement_vs_float"] < p["min_top1"]:
            problems.append(f"top-1 agreement with the float model {result['quality']['top1_agreement_vs_float']:.3f} "
                            f"< {p['min_top1']}")
        if problems:
            raise KilnError("kuiper.verify: " + "; ".join(problems))


def report_md(r: dict[str, Any]) -> str:
    h, lay, q = r["header"], r["layout"], r["quality"]
    return "\n".join([
        f"# Kuiper int8 file read back ({r['label']})", "",
        f"Header: dim {h['dim']}, hidden_dim {h['hidden_dim']}, {h['n_layers']} layers, {h['n_heads']} heads "
        f"({h['n_kv_heads']} KV), vocab_size {h['vocab_size']}, max_seq_len {h['max_seq_len']}, group {h['group_size']}; "
        f"{r['size_bytes'] / 1e6:.1f} MB.", "",
        f"| {r['tokens']} prompt tokens | max abs Δlogit | top-1 agreement | cosine mean (min) |",
        "|---|---:|---:|---:|",
        f"| reader vs HF with the same int8 weights (layout) | {lay['max_abs_diff_vs_hf_same_int8']:.2e} "
        f"(logits up to {lay['logit_scale']:.1f}) | {lay['top1_agreement']:.3f} | — |",
        f"| reader vs HF float (int8 cost) | — | {q['top1_agreement_vs_float']:.3f} | "
        f"{q['cosine_mean_vs_float']:.5f} ({q['cosine_min_vs_float']:.5f}) |", ""])
