"""quantize: weight PTQ of the model with the scheme's algorithm (rtn / mse / seqmse / gptq),
calibrated on real chat-formatted prompts that start with BOS (their activations are the
largest), and perplexity float vs quantized on the held-out text (torch fake-quant).

Writes quantize.json (algorithm, PPL float/quantized, per-weight SQNR and grid). Weight-only
for now: activation/KV quantization, AIMET encodings and QDQ ONNX are the next steps (issue 4).
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from ..stage import Stage, StageContext

if TYPE_CHECKING:
    from ..recipe import Recipe


class QuantizeParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    calibration_samples: int = Field(8, ge=1, description="Chat-formatted calibration prompts.")
    calibration_tokens: int = Field(128, ge=8, description="Text tokens per calibration prompt.")
    calibration_rows: int = Field(256, ge=16, description="Token rows kept per layer for SeqMSE/GPTQ.")
    eval_ctx: int = Field(512, ge=16, description="Perplexity window (tokens).")
    eval_windows: int = Field(8, ge=1, description="Non-overlapping windows of evaluation text scored.")


def calibration_batches(tokenizer: Any, text: str, samples: int, tokens: int) -> list[Any]:
    """Real prompts: chat template around a text chunk, answered by the next chunk, BOS first."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    batches = []
    for i in range(samples):
        a = ids[(2 * i) * tokens:(2 * i + 1) * tokens]
        b = ids[(2 * i + 1) * tokens:(2 * i + 2) * tokens]
        if len(b) < tokens:
            break
        if tokenizer.chat_template:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Continue: " + tokenizer.decode(a)}],
                                                   add_generation_prompt=True, tokenize=True)
            prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        else:  # a base model: plain text
            prompt = list(a)
        bos = tokenizer.bos_token_id
        if bos is not None and (not prompt or prompt[0] != bos):
            prompt = [bos] + prompt
        batches.append(torch.tensor([prompt + b]))
    return batches


class Quantize(Stage):
    """Weight PTQ + perplexity float vs quantized."""

    name = "quantize"
    version = 1
    Params = QuantizeParams
    tools = ("python", "torch", "transformers")
    resource = "heavy"

    @classmethod
    def applies(cls, recipe: "Recipe") -> bool:
        return recipe.target.runtime == "genie"

    @classmethod
    def inputs(cls, recipe: "Recipe", variant: str = "") -> list[str]:
        return ["model", "text"]

    @classmethod
    def params(cls, recipe: "Recipe", variant: str = "") -> dict[str, Any]:
        s = recipe.scheme
        return {**recipe.stage_params(cls.name), "algorithm": s.algorithm,
                "scheme": {"weights": s.weights.model_dump(mode="json"),
                           "overrides": [o.model_dump(mode="json") for o in s.overrides]}}

    def run(self, ctx: StageContext) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..quant.model import capture_inputs, perplexity, quantize_weights

        p = ctx.params
        tokenizer = AutoTokenizer.from_pretrained(ctx.inputs["model"])
        model = AutoModelForCausalLM.from_pretrained(ctx.inputs["model"], dtype=torch.float32).eval()
        eval_ids = tokenizer((ctx.inputs["text"] / "evaluation.txt").read_text(), add_special_tokens=False)["input_ids"]
        ppl_float = perplexity(model, eval_ids, p["eval_ctx"], p["eval_windows"])
        ctx.log.info(f"float PPL {ppl_float:.4f}")
        algorithm = "rtn" if p["algorithm"] in ("none", "rtn") else p["algorithm"]
        inputs = {}
        if algorithm in ("seqmse", "gptq"):
            batches = calibration_batches(tokenizer, (ctx.inputs["text"] / "calibration.txt").read_text(),
                                          p["calibration_samples"], p["calibration_tokens"])
            inputs = capture_inputs(model, batches, p["calibration_rows"])
            ctx.log.info(f"calibration: {len(batches)} prompts, {sum(b.shape[1] for b in batches)} tokens")
        rows = quantize_weights(model, p["scheme"], algorithm, inputs)
        ppl_quant = perplexity(model, eval_ids, p["eval_ctx"], p["eval_windows"])
        report = {"algorithm": algorithm, "ppl_float": ppl_float, "ppl_quantized": ppl_quant,
                  "delta_pct": 100 * (ppl_quant / ppl_float - 1), "eval_tokens": p["eval_ctx"] * p["eval_windows"],
                  "weights": [{k: v for k, v in r.items() if k not in ("scale", "offset")} for r in rows]}
        (ctx.out / "quantize.json").write_text(json.dumps(report, indent=2) + "\n")
        ctx.log.info(f"{algorithm}: PPL {ppl_float:.4f} → {ppl_quant:.4f} ({report['delta_pct']:+.2f}%), "
                     f"{len(rows)} weights, min SQNR {min(r['sqnr_db'] for r in rows):.1f} dB")
