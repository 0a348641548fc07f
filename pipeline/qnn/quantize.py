"""qnn.quantize: PTQ of the adapted model for HTP, per the recipe's scheme.

1. Weights: the scheme's algorithm (rtn / mse / seqmse / gptq) on every projection and the LM
   head, calibrated on real chat-formatted prompts that start with BOS (their activations are
   the largest); embeddings and norm gammas on their override grids.
2. Activations (16-bit, asymmetric) and the KV cache (8-bit, one encoding per layer and kind,
   shared by past_*_in/_out and every AR graph: Genie copies KV bytes raw): min-max ranges on
   the same prompts, run through the AR graph step by step as on the device.
3. Per AR graph: a QDQ ONNX carrying exactly those encodings, and AIMET encodings JSON for
   `qairt-converter --quantization_overrides`.
4. Perplexity on held-out text, every figure through the largest AR graph step by step: float,
   the torch sim (pipeline/qnn/quant/sim.py) and the QDQ ONNX in onnxruntime. The stage fails when
   the QDQ graph and the sim disagree by more than `max_qdq_sim_gap_pct`.
Report: quantize.json, report.md (with the export's onnxruntime-vs-HF check per graph); the run's
timings and calibration device go to ctx.info (timings.json).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from pipeline.engine.cost import human_bytes, own_peak_rss, return_free_memory
from pipeline.engine.errors import KilnError
from pipeline.engine.stage import StageContext, Strict
from pipeline.qnn.common import EXPORT, QUANTIZE, GraphStage, calibration_device, export_nodes
from pipeline.recipe.size import peak_estimate

if TYPE_CHECKING:
    from pipeline.qnn.adapted_llama import Step
    from pipeline.qnn.quant.encodings import Encoding
    from pipeline.qnn.quant.qdq import QuantParam
    from pipeline.recipe.load import Recipe
    from pipeline.recipe.schema import SchemeSpec


class QnnQuantizeParams(Strict):
    calibration_samples: int = Field(8, ge=1, description="Chat-formatted calibration prompts for the activation and KV "
                                     "ranges (run through the AR graph step by step).")
    weight_calibration_samples: int = Field(64, ge=1, description="Calibration prompts SeqMSE/GPTQ see (layer by layer; "
                                            "the first `calibration_samples` of them are the activation prompts).")
    calibration_tokens: int = Field(128, ge=8, description="Text tokens per calibration prompt (and as many answering).")
    eval_windows: int = Field(8, ge=1, description="Non-overlapping windows of context_length tokens of evaluation text scored.")
    encodings_version: Literal["1.0.0", "0.6.1"] = Field("1.0.0", description="AIMET encodings file version.")
    max_qdq_sim_gap_pct: float = Field(1.0, gt=0,
                                       description="Fail when the QDQ ONNX's PPL differs more than this from the torch sim's.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where weight calibration (SeqMSE/GPTQ) runs; auto = CUDA when present.")


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


def scheme_params(s: SchemeSpec) -> dict[str, Any]:
    """What of a scheme the quantize stage reads (its part of the stage key)."""
    return {"engine": s.engine, "weights": s.weights.model_dump(mode="json"), "activations": s.activations.bits,
            "float16_outlier_ratio": s.activations.float16_outlier_ratio, "kv_cache": s.kv_cache.bits,
            "overrides": [o.model_dump(mode="json") for o in s.overrides]}


def graph_file(export_dir: Path) -> Path:
    return next(p for p in export_dir.glob("*.onnx"))


class QnnQuantize(GraphStage):
    """PTQ: QDQ ONNX + AIMET encodings per AR graph, PPL float / sim / QDQ."""

    name = QUANTIZE
    version = 4  # 4: report.md without the recipe's name (entries are shared between recipes)
    Params = QnnQuantizeParams

    @classmethod
    def tool_names(cls, recipe: Recipe, variant: str = "") -> tuple[str, ...]:
        return cls.tools + (("aimet-onnx",) if recipe.scheme.engine == "aimet" else ())

    @classmethod
    def inputs(cls, recipe: Recipe, variant: str = "") -> list[str]:
        return ["model", "text", *export_nodes(recipe)]

    @classmethod
    def peak_memory(cls, recipe: Recipe, variant: str = "") -> int | None:
        return peak_estimate(recipe, QUANTIZE)

    @classmethod
    def params(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        s = recipe.scheme
        own = recipe.stage_params(cls.name)
        if any(o.activations for o in s.overrides):
            raise KilnError(f"{recipe.where('scheme')}: scheme {s.name!r}: overrides[].activations is not supported by "
                            f"{cls.name}; use activations.float16_outlier_ratio for mixed precision")
        if s.engine == "aimet":
            from pipeline.qnn.quant.aimet_engine import ALGORITHMS
            algorithm = "rtn" if s.algorithm == "none" else s.algorithm
            problem = (f"algorithm {algorithm!r} (the aimet engine runs {', '.join(ALGORITHMS)})"
                       if algorithm not in ALGORITHMS else
                       "activations.float16_outlier_ratio (Kiln's mixed precision)" if s.activations.float16_outlier_ratio
                       else f"activations.bits {s.activations.bits} (8 or 16)" if s.activations.bits not in (8, 16)
                       else None)
            if problem:
                raise KilnError(f"{recipe.where('scheme')}: scheme.engine: aimet (scheme {s.name!r}) does not support {problem}")
        blocked = [w for w in [s.weights] + [o.weights for o in s.overrides if o.weights] if w.granularity == "per-block"]
        if own["encodings_version"] == "0.6.1" and blocked:
            raise KilnError(f"{recipe.where('stages', cls.name, 'encodings_version')}: stages.{cls.name}.encodings_version: "
                            f"0.6.1 cannot express the per-block weights of scheme {s.name!r}; use 1.0.0")
        return {**own, "device": calibration_device(own["device"]), "algorithm": s.algorithm,
                "context_length": recipe.spec.context_length, "scheme": scheme_params(s)}

    def run(self, ctx: StageContext) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pipeline.qnn.adapted_llama import AdaptedLlama, ar_perplexity, io_names, release_weights, torch_step
        from pipeline.qnn.onnx_check import ort_session, ort_step
        from pipeline.qnn.quant import encodings, qdq

        p, scheme = ctx.params, ctx.params["scheme"]
        context = p["context_length"]
        exports = {n: json.loads((d / "export.json").read_text()) | {"dir": d}
                   for n, d in ctx.inputs.items() if n.startswith(EXPORT)}
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
            raise KilnError(f"qnn.quantize: the calibration text is shorter than {2 * p['calibration_tokens']} tokens")
        if len(eval_ids) < context:
            raise KilnError(f"qnn.quantize: the evaluation text ({len(eval_ids)} tokens) is shorter than one window "
                            f"of context_length {context}")

        def timed(label: str, fn, *args):
            t0 = time.monotonic()
            value = fn(*args)
            ctx.log.info(f"{label}: {value if isinstance(value, float) else 'done'} ({time.monotonic() - t0:.1f}s, "
                         f"peak RSS so far {human_bytes(own_peak_rss())})")
            return value

        def ppl(step) -> float:
            return ar_perplexity(step, hf, eval_ids, ar, context, p["eval_windows"])

        ppl_float = timed("float PPL", ppl, torch_step(AdaptedLlama(hf).eval()))
        algorithm = "rtn" if p["algorithm"] in ("none", "rtn") else p["algorithm"]
        float_onnx = graph_file(main["dir"])
        structure = qdq.load_structure(float_onnx)

        cal = Calibration(hf, prompts, weight_prompts, ar, context, names_in, names_out)
        engine = _aimet_engine if scheme["engine"] == "aimet" else _kiln_engine
        params, acts, ppl_sim, rows, timings = engine(ctx, cal, float_onnx, structure, algorithm,
                                                      lambda step: timed(f"{scheme['engine']} sim PPL", ppl, step))
        release_weights(hf)  # from here on only its config and RoPE tables are read
        act_bits = scheme["activations"]
        encodings.check_device_rules(acts, {n: q.encoding for n, q in params.items()}, scheme["kv_cache"],
                                     qdq.conv_weights(structure), f"quantize ({scheme['engine']} engine)")
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

        # 4. the QDQ graph in onnxruntime, step by step like the sim; the integer codes are in the QDQ
        # files now, and onnxruntime is about to hold the weights once more (at 1B: 1.2 GB less)
        del params
        return_free_memory()
        session = ort_session(ctx.out / f"{main['graph']}.qdq.onnx")
        ppl_qdq = timed("QDQ ONNX PPL (onnxruntime)", ppl, ort_step(session, names_in, names_out))
        gap = 100 * (ppl_qdq / ppl_sim - 1)
        report = {"engine": scheme["engine"], "algorithm": algorithm,
                  "weight_calibration_tokens": sum(map(len, cal.weight_prompts)),
                  "ppl_float": ppl_float, "ppl_sim": ppl_sim, "ppl_qdq": ppl_qdq,
                  "delta_sim_pct": 100 * (ppl_sim / ppl_float - 1), "delta_qdq_pct": 100 * (ppl_qdq / ppl_float - 1),
                  "qdq_vs_sim_pct": gap, "eval_tokens": context * min(p["eval_windows"], len(eval_ids) // context),
                  "ar": ar, "context_length": context, "encodings_version": p["encodings_version"],
                  "activation_tensors": len(acts), "graphs": graphs,
                  "weights": [{k: v for k, v in r.items() if k not in ("grid", "scale", "zero")} for r in rows]}
        (ctx.out / "quantize.json").write_text(json.dumps(report, indent=2) + "\n")
        (ctx.info / "timings.json").write_text(json.dumps({"device": p["device"], **timings}, indent=2) + "\n")
        (ctx.out / "report.md").write_text(report_md(report))
        ctx.log.info(f"{algorithm}: PPL float {ppl_float:.4f}, sim {ppl_sim:.4f} ({report['delta_sim_pct']:+.2f}%), "
                     f"QDQ {ppl_qdq:.4f} ({report['delta_qdq_pct']:+.2f}%); QDQ vs sim {gap:+.2f}%; "
                     f"min weight SQNR {min(r['sqnr_db'] for r in rows):.1f} dB")
        if abs(gap) > p["max_qdq_sim_gap_pct"]:
            raise KilnError(f"qnn.quantize: the QDQ ONNX (PPL {ppl_qdq:.4f}) and the {scheme['engine']} sim (PPL "
                            f"{ppl_sim:.4f}) differ by "
                            f"{gap:+.2f}%, more than max_qdq_sim_gap_pct {p['max_qdq_sim_gap_pct']}")


@dataclass
class Calibration:
    """What both engines calibrate on."""

    hf: Any                                 # the HF model (the kiln engine quantizes its weights in place)
    prompts: list[list[int]]                # activation and KV ranges
    weight_prompts: list[list[int]]         # SeqMSE / GPTQ
    ar: int
    context: int
    names_in: list[str]
    names_out: list[str]

    def drive(self, step: Step) -> list[Any]:
        """The activation prompts through a graph step function, step by step as on the device."""
        from pipeline.engine.progress import progress
        from pipeline.qnn.adapted_llama import run_steps

        return [run_steps(step, self.hf, b, self.ar, self.context)
                for b in progress(self.prompts, "activation ranges", "prompt")]


# (QuantParams by initializer, activation encodings by tensor, the sim's PPL, report rows, timings)
EngineResult = tuple[dict[str, "QuantParam"], dict[str, "Encoding"], float, list[dict[str, Any]], dict[str, Any]]
# An engine scores its sim with this (the stage's perplexity) before it lets the sim go.
Score = Callable[["Step"], float]


def _kiln_engine(ctx: StageContext, cal: Calibration, float_onnx: Path, structure: Any, algorithm: str,
                 score: Score) -> EngineResult:
    """Kiln's PTQ: weights by the algorithm in torch (sequentially for SeqMSE/GPTQ), KV encodings
    from the torch sim, which is scored and freed before the activation ranges are taken on the
    weight-quantized graph in onnxruntime (at 1B each of the two holds the weights once)."""
    from pipeline.qnn.adapted_llama import release_weights
    from pipeline.qnn.quant import qdq
    from pipeline.qnn.quant.flow import calibrated_sim, float16_ratio, pick_device, quantize_model

    p, scheme = ctx.params, ctx.params["scheme"]
    device = pick_device(p["device"])  # cpu or cuda, settled at plan time
    shapes = {i.name: tuple(i.dims) for i in structure.graph.initializer}
    rows, params, weight_seconds = quantize_model(cal.hf, scheme, algorithm, cal.weight_prompts, shapes, device,
                                                  ctx.resume / "calibration")
    return_free_memory()  # calibration's working copies, before the sim adds the dequantized weights
    ctx.log.info(f"weights: {algorithm} on {device} ({len(cal.weight_prompts)} prompts, "
                 f"{sum(map(len, cal.weight_prompts))} tokens), {len(rows)} projections + {len(params) - len(rows)} "
                 f"other params ({weight_seconds:.1f}s, peak RSS so far {human_bytes(own_peak_rss())})")
    block = scheme["weights"].get("block_size")
    wide = [r["name"] for r in rows if block and r["granularity"] == "per-channel"
            and scheme["weights"]["granularity"] == "per-block" and r["bits"] == scheme["weights"]["bits"]]
    if wide:
        ctx.log.info(f"{len(wide)} weights per-channel: blocks of {block} do not divide their input width "
                     f"(e.g. {wide[0]})")
    sim = calibrated_sim(cal.hf, params, scheme, cal.prompts, cal.ar, cal.context)
    kv, sim_float16 = sim.kv_encodings(), sim.float16_share()
    ppl_sim = score(sim.step())
    del sim  # with the HF model's float weights: onnxruntime below holds the weights once more
    release_weights(cal.hf)
    return_free_memory()
    act_bits, ratio = scheme["activations"], float16_ratio(scheme)
    # activation statistics on the weight-quantized graph (as the sim's)
    tensors = [t for t in qdq.activation_tensors(structure) if not t.startswith("past_")]
    acts: dict[str, Any] = {}
    if act_bits < 32:
        weights_only = ctx.tmp / "weights_only" / float_onnx.name
        weights_only.parent.mkdir()
        qdq.build_qdq(float_onnx, weights_only, structure.graph.name, params, {})
        stats = qdq.calibrate_ranges(weights_only, tensors, cal.names_in, cal.names_out, cal.drive,
                                     ctx.tmp / "calibration")
        acts = {t: o.encoding(t, act_bits, ratio) for t, o in stats.items()}
        ctx.log.info(f"activation ranges: {len(acts)} tensors (peak RSS so far {human_bytes(own_peak_rss())})")
    acts.update(kv)  # past_*_in/_out: the sim's shared KV encodings
    float16 = sum(e.is_float for e in acts.values())
    if float16:
        ctx.log.info(f"float16 (max |x| > {ratio:g} × mean |x|): {float16} of {len(acts)} activation "
                     f"tensors in the graph, {100 * sim_float16:.1f}% of the sim's")
    return params, acts, ppl_sim, rows, {"weight_seconds": round(weight_seconds, 2)}


def _aimet_engine(ctx: StageContext, cal: Calibration, float_onnx: Path, structure: Any, algorithm: str,
                  score: Score) -> EngineResult:
    """aimet-onnx computes the encodings on the float graph; Kiln turns them into QuantParams."""
    import copy

    import numpy as np
    import onnx
    import torch

    from pipeline.qnn.adapted_llama import AdaptedLlama, hf_names, run_steps, torch_step
    from pipeline.qnn.quant import aimet_engine, qdq
    from pipeline.qnn.quant.model import sqnr_db

    scheme = ctx.params["scheme"]
    names = hf_names(cal.hf.config.num_hidden_layers)
    feeds: list[dict[str, np.ndarray]] = []
    if algorithm == "seqmse":  # AIMET's SeqMSE data: the float graph's inputs at every calibration step
        for b in cal.prompts:
            run_steps(torch_step(AdaptedLlama(cal.hf).eval()), cal.hf, b, cal.ar, cal.context,
                      lambda inputs, _: feeds.append({n: t.numpy() for n, t in zip(cal.names_in, inputs)}))
    model = qdq.load_structure(float_onnx)
    qdq.load_weights(model, float_onnx.parent)
    t0 = time.monotonic()
    doc, sim_step = aimet_engine.aimet_encodings(copy.deepcopy(model), scheme, algorithm, lambda w: names.get(w, w),
                                                 cal.names_in, cal.names_out, cal.drive, feeds,
                                                 ctx.tmp / "aimet")
    seconds = time.monotonic() - t0
    floats = {i.name: i for i in model.graph.initializer}
    acts, param_encodings = aimet_engine.read_document(doc, set(floats),
                                                       str(ctx.tmp / "aimet" / "aimet.encodings"))
    params = aimet_engine.params_from_encodings(model, param_encodings)
    ctx.log.info(f"AIMET {algorithm}: {len(params)} param and {len(acts)} activation encodings ({seconds:.1f}s)")
    rows = [{"name": n, "bits": q.encoding.bits, "granularity": q.encoding.enc_type.lower().replace("_", "-"),
             "block_size": q.block_size, "symmetric": q.encoding.symmetric,
             "sqnr_db": round(sqnr_db(torch.from_numpy(onnx.numpy_helper.to_array(floats[n]).astype(np.float32)),
                                      torch.from_numpy(qdq.dequantize(q))), 3)}
            for n, q in sorted(params.items())]
    return params, acts, score(sim_step), rows, {"weight_seconds": round(seconds, 2)}


def report_md(r: dict[str, Any]) -> str:
    lines = ["# Quantization report", "",
             "## ONNX export: onnxruntime vs HF on evaluation text", "",
             "| graph | tokens | max abs Δlogits | top-1 agreement |", "|---|---:|---:|---:|"]
    lines += [f"| {g['graph']} | {g['export_check']['tokens']} | {g['export_check']['max_abs_logit_diff']:.3g} | "
              f"{g['export_check']['top1_agreement']:.4f} |" for g in r["graphs"]]
    lines += ["", f"## Perplexity ({r['eval_tokens']} held-out tokens, AR-{r['ar']} graph, context {r['context_length']})",
              "", "| model | PPL | Δ vs float |", "|---|---:|---:|",
              f"| float | {r['ppl_float']:.4f} | — |",
              f"| {r['engine']} sim ({r['algorithm']}) | {r['ppl_sim']:.4f} | {r['delta_sim_pct']:+.2f}% |",
              f"| QDQ ONNX, onnxruntime | {r['ppl_qdq']:.4f} | {r['delta_qdq_pct']:+.2f}% |", "",
              "## Weights (SQNR)", "", "| weight | bits | granularity | SQNR dB |", "|---|---:|---|---:|"]
    lines += [f"| {w['name']} | {w['bits']} | {w['granularity']}{'/' + str(w['block_size']) if w['block_size'] else ''} "
              f"| {w['sqnr_db']} |" for w in r["weights"]]
    return "\n".join(lines) + "\n"
