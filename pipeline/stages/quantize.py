"""quantize: PTQ of the adapted model for HTP, per the recipe's scheme.

1. Weights: the scheme's algorithm (rtn / mse / seqmse / gptq) on every projection and the LM
   head, calibrated on real chat-formatted prompts that start with BOS (their activations are
   the largest); embeddings and norm gammas on their override grids.
2. Activations (16-bit, asymmetric) and the KV cache (8-bit, one encoding per layer and kind,
   shared by past_*_in/_out and every AR graph: Genie copies KV bytes raw): min-max ranges on
   the same prompts, run through the AR graph step by step as on the device.
3. Per AR graph: a QDQ ONNX carrying exactly those encodings, and AIMET encodings JSON for
   `qairt-converter --quantization_overrides`.
4. Perplexity on held-out text, every figure through the largest AR graph step by step: float,
   the torch sim (pipeline/quant/sim.py) and the QDQ ONNX in onnxruntime. The stage fails when
   the QDQ graph and the sim disagree by more than `max_qdq_sim_gap_pct`.
Report: quantize.json, report.md (with the export's onnxruntime-vs-HF check per graph).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import KilnError
from ..stage import Stage, StageContext
from .export_onnx import ExportOnnx

if TYPE_CHECKING:
    from ..recipe import Recipe
    from ..recipe_schema import SchemeSpec


class QuantizeParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    calibration_samples: int = Field(8, ge=1, description="Chat-formatted calibration prompts for the activation and KV ranges (run through the AR graph step by step).")
    weight_calibration_samples: int = Field(64, ge=1, description="Calibration prompts SeqMSE/GPTQ see (layer by layer; the first `calibration_samples` of them are the activation prompts).")
    calibration_tokens: int = Field(128, ge=8, description="Text tokens per calibration prompt (and as many answering).")
    eval_windows: int = Field(8, ge=1, description="Non-overlapping windows of context_length tokens of evaluation text scored.")
    encodings_version: Literal["1.0.0", "0.6.1"] = Field("1.0.0", description="AIMET encodings file version.")
    max_qdq_sim_gap_pct: float = Field(1.0, gt=0, description="Fail when the QDQ ONNX's PPL differs more than this from the torch sim's.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where weight calibration (SeqMSE/GPTQ) runs; auto = CUDA when present.")


def calibration_batches(tokenizer: Any, text: str, samples: int, tokens: int) -> list[list[int]]:
    """Real prompts: chat template around a text chunk, answered by the next chunk, BOS first."""
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
        batches.append(prompt + b)
    return batches


def scheme_params(s: "SchemeSpec") -> dict[str, Any]:
    """What of a scheme the quantize stage reads (its part of the stage key)."""
    return {"weights": s.weights.model_dump(mode="json"), "activations": s.activations.bits,
            "float16_outlier_ratio": s.activations.float16_outlier_ratio, "kv_cache": s.kv_cache.bits,
            "overrides": [o.model_dump(mode="json") for o in s.overrides]}


def graph_file(export_dir: Path) -> Path:
    return next(p for p in export_dir.glob("*.onnx"))


class Quantize(Stage):
    """PTQ: QDQ ONNX + AIMET encodings per AR graph, PPL float / sim / QDQ."""

    name = "quantize"
    version = 3
    Params = QuantizeParams
    tools = ("python", "torch", "transformers", "onnx", "onnxruntime", "numpy")
    resource = "heavy"

    @classmethod
    def applies(cls, recipe: "Recipe") -> bool:
        return recipe.target.runtime == "genie"

    @classmethod
    def inputs(cls, recipe: "Recipe", variant: str = "") -> list[str]:
        return ["model", "text"] + [f"{ExportOnnx.name}@{v}" for v in ExportOnnx.variants(recipe)]

    @classmethod
    def params(cls, recipe: "Recipe", variant: str = "") -> dict[str, Any]:
        s = recipe.scheme
        own = recipe.stage_params(cls.name)
        if any(o.activations for o in s.overrides):
            raise KilnError(f"{recipe.where('scheme')}: scheme {s.name!r}: overrides[].activations is not supported by "
                            "the quantize stage; use activations.float16_outlier_ratio for mixed precision")
        blocked = [w for w in [s.weights] + [o.weights for o in s.overrides if o.weights] if w.granularity == "per-block"]
        if own["encodings_version"] == "0.6.1" and blocked:
            raise KilnError(f"{recipe.where('stages', 'quantize', 'encodings_version')}: stages.quantize.encodings_version: "
                            f"0.6.1 cannot express the per-block weights of scheme {s.name!r}; use 1.0.0")
        return {**own, "algorithm": s.algorithm, "context_length": recipe.spec.context_length,
                "scheme": scheme_params(s)}

    def run(self, ctx: StageContext) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..adapted_llama import AdaptedLlama, ar_perplexity, io_names, run_steps, torch_step
        from ..onnx_check import ort_session, ort_step
        from ..quant import encodings, qdq
        from ..quant.flow import calibrated_sim, float16_ratio, pick_device, quantize_model

        p, scheme = ctx.params, ctx.params["scheme"]
        context = p["context_length"]
        exports = {n: json.loads((d / "export.json").read_text()) | {"dir": d}
                   for n, d in ctx.inputs.items() if n.startswith(ExportOnnx.name)}
        main = max(exports.values(), key=lambda e: e["ar"])  # calibrate and evaluate on the widest graph
        ar = main["ar"]
        tokenizer = AutoTokenizer.from_pretrained(ctx.inputs["model"])
        hf = AutoModelForCausalLM.from_pretrained(ctx.inputs["model"], dtype=torch.float32).eval()
        names_in, names_out = io_names(hf.config.num_hidden_layers)
        eval_ids = tokenizer((ctx.inputs["text"] / "evaluation.txt").read_text(), add_special_tokens=False)["input_ids"]
        weight_prompts = [b[:context] for b in calibration_batches(
            tokenizer, (ctx.inputs["text"] / "calibration.txt").read_text(),
            max(p["calibration_samples"], p["weight_calibration_samples"]), p["calibration_tokens"])]
        prompts = weight_prompts[:p["calibration_samples"]]
        weight_prompts = weight_prompts[:p["weight_calibration_samples"]]
        if not prompts:
            raise KilnError(f"quantize: the calibration text is shorter than {2 * p['calibration_tokens']} tokens")
        if len(eval_ids) < context:
            raise KilnError(f"quantize: the evaluation text ({len(eval_ids)} tokens) is shorter than one window "
                            f"of context_length {context}")

        def timed(label: str, fn, *args):
            t0 = time.monotonic()
            value = fn(*args)
            ctx.log.info(f"{label}: {value if isinstance(value, float) else 'done'} ({time.monotonic() - t0:.1f}s)")
            return value

        def ppl(step) -> float:
            return ar_perplexity(step, hf, eval_ids, ar, context, p["eval_windows"])

        ppl_float = timed("float PPL", ppl, torch_step(AdaptedLlama(hf).eval()))

        # 1. weights, 2. the sim
        algorithm = "rtn" if p["algorithm"] in ("none", "rtn") else p["algorithm"]
        device = pick_device(p["device"])
        float_onnx = graph_file(main["dir"])
        structure = qdq.load_structure(float_onnx)
        shapes = {i.name: tuple(i.dims) for i in structure.graph.initializer}
        rows, params, weight_seconds = quantize_model(hf, scheme, algorithm, weight_prompts, shapes, device)
        ctx.log.info(f"weights: {algorithm} on {device} ({len(weight_prompts)} prompts, "
                     f"{sum(map(len, weight_prompts))} tokens), {len(rows)} projections + {len(params) - len(rows)} "
                     f"other params ({weight_seconds:.1f}s)")
        sim = calibrated_sim(hf, params, scheme, prompts, ar, context)
        ppl_sim = timed("torch sim PPL", ppl, sim.step())
        act_bits, ratio = scheme["activations"], float16_ratio(scheme)

        # 3. activation statistics on the weight-quantized graph (as the sim's), then QDQ + encodings
        tensors = [t for t in qdq.activation_tensors(structure) if not t.startswith("past_")]
        acts: dict[str, Any] = {}
        if act_bits < 32:
            weights_only = ctx.out.parent / "weights_only" / float_onnx.name
            weights_only.parent.mkdir()
            qdq.build_qdq(float_onnx, weights_only, main["graph"], params, {})
            stats = qdq.calibrate_ranges(weights_only, tensors, names_in, names_out,
                                         lambda step: [run_steps(step, hf, b, ar, context) for b in prompts],
                                         ctx.out.parent / "calibration")
            acts = {t: o.encoding(t, act_bits, ratio) for t, o in stats.items()}
        acts.update(sim.kv_encodings())  # past_*_in/_out: the sim's shared KV encodings
        float16 = sum(e.is_float for e in acts.values())
        if float16:
            ctx.log.info(f"float16 (max |x| > {ratio:g} × mean |x|): {float16} of {len(acts)} activation "
                         f"tensors in the graph, {100 * sim.float16_share():.1f}% of the sim's")
        quantizer_args = {"activation_bitwidth": act_bits, "param_bitwidth": scheme["weights"]["bits"],
                          "kv_bitwidth": scheme["kv_cache"], "dtype": "int", "algorithm": algorithm,
                          "per_channel_quantization": scheme["weights"]["granularity"] != "per-tensor"}
        # tensor names are the same in every AR graph, and so are the encodings
        doc = encodings.render([acts[t] for t in sorted(acts)], [params[n].encoding for n in sorted(params)],
                               p["encodings_version"], quantizer_args)
        graphs = []
        for e in sorted(exports.values(), key=lambda e: -e["ar"]):
            dst = ctx.out / f"{e['graph']}.qdq.onnx"
            timed(f"QDQ {dst.name}", qdq.build_qdq, graph_file(e["dir"]), dst, e["graph"], params, acts)
            encodings.write(ctx.out / f"{e['graph']}.encodings.json", doc)
            graphs.append({"graph": e["graph"], "ar": e["ar"], "qdq": dst.name, "encodings": f"{e['graph']}.encodings.json",
                           "export_check": {k: e[k] for k in ("tokens", "max_abs_logit_diff", "top1_agreement")}})

        # 4. the QDQ graph in onnxruntime, step by step like the sim
        session = ort_session(ctx.out / f"{main['graph']}.qdq.onnx")
        ppl_qdq = timed("QDQ ONNX PPL (onnxruntime)", ppl, ort_step(session, names_in, names_out))
        gap = 100 * (ppl_qdq / ppl_sim - 1)
        report = {"algorithm": algorithm, "device": device, "weight_seconds": round(weight_seconds, 2),
                  "weight_calibration_tokens": sum(map(len, weight_prompts)),
                  "ppl_float": ppl_float, "ppl_sim": ppl_sim, "ppl_qdq": ppl_qdq,
                  "delta_sim_pct": 100 * (ppl_sim / ppl_float - 1), "delta_qdq_pct": 100 * (ppl_qdq / ppl_float - 1),
                  "qdq_vs_sim_pct": gap, "eval_tokens": context * min(p["eval_windows"], len(eval_ids) // context),
                  "ar": ar, "context_length": context, "encodings_version": p["encodings_version"],
                  "activation_tensors": len(acts), "graphs": graphs,
                  "weights": [{k: v for k, v in r.items() if k not in ("grid", "scale", "zero")} for r in rows]}
        (ctx.out / "quantize.json").write_text(json.dumps(report, indent=2) + "\n")
        (ctx.out / "report.md").write_text(report_md(ctx.recipe_name, report))
        ctx.log.info(f"{algorithm}: PPL float {ppl_float:.4f}, sim {ppl_sim:.4f} ({report['delta_sim_pct']:+.2f}%), "
                     f"QDQ {ppl_qdq:.4f} ({report['delta_qdq_pct']:+.2f}%); QDQ vs sim {gap:+.2f}%; "
                     f"min weight SQNR {min(r['sqnr_db'] for r in rows):.1f} dB")
        if abs(gap) > p["max_qdq_sim_gap_pct"]:
            raise KilnError(f"quantize: the QDQ ONNX (PPL {ppl_qdq:.4f}) and the torch sim (PPL {ppl_sim:.4f}) differ by "
                            f"{gap:+.2f}%, more than max_qdq_sim_gap_pct {p['max_qdq_sim_gap_pct']}")


def report_md(recipe: str, r: dict[str, Any]) -> str:
    lines = [f"# {recipe}: quantization report", "",
             "## ONNX export: onnxruntime vs HF on evaluation text", "",
             "| graph | tokens | max abs Δlogits | top-1 agreement |", "|---|---:|---:|---:|"]
    lines += [f"| {g['graph']} | {g['export_check']['tokens']} | {g['export_check']['max_abs_logit_diff']:.3g} | "
              f"{g['export_check']['top1_agreement']:.4f} |" for g in r["graphs"]]
    lines += ["", f"## Perplexity ({r['eval_tokens']} held-out tokens, AR-{r['ar']} graph, context {r['context_length']})",
              "", "| model | PPL | Δ vs float |", "|---|---:|---:|",
              f"| float | {r['ppl_float']:.4f} | — |",
              f"| torch sim ({r['algorithm']}) | {r['ppl_sim']:.4f} | {r['delta_sim_pct']:+.2f}% |",
              f"| QDQ ONNX, onnxruntime | {r['ppl_qdq']:.4f} | {r['delta_qdq_pct']:+.2f}% |", "",
              "## Weights (SQNR)", "", "| weight | bits | granularity | SQNR dB |", "|---|---:|---|---:|"]
    lines += [f"| {w['name']} | {w['bits']} | {w['granularity']}{'/' + str(w['block_size']) if w['block_size'] else ''} "
              f"| {w['sqnr_db']} |" for w in r["weights"]]
    return "\n".join(lines) + "\n"
