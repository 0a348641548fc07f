"""qnn.verify: the compiled context binaries on the x86 HTP simulator (onnxruntime-qnn), two ways.

(a) Numerics: real text through the unshared binaries as Genie runs them — the prompt through the
    widest AR graph, then greedy AR-1 decode steps — with quantized device I/O (io.json); the
    logits are compared with the float HF model and with the CPU QDQ graphs run the same way
    (top-1 agreement, cosine). It fails when the simulator does not compute the quantized model
    (vs CPU QDQ below `min_top1` / `min_cosine`) or loses more top-1 agreement with the float
    model than the quantization itself does (`max_top1_drop`).
(b) The real Genie runtime (libGenie, x86): the bundle's dialog config — rendered from the same
    templates and qnn.genie_config params — pointed at the unshared binaries (the simulator cannot
    load the weight-shared one) with a greedy sampler, answers each prompt; the float model's greedy answer must match
    for `match_tokens` tokens.
    Genie's log and its tokens/s (simulator, not phone) go to ctx.info (they differ on every run). The sampler is not part
of this stage's key (it is replaced by greedy), so a sampler tweak does not rerun it.
The simulator is slow (~20 s per AR-1 step and ~2 min per AR-128 step for SmolLM2-135M on two
cores), so the defaults keep both parts short.
"""
from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from pydantic import Field

from pipeline.engine.errors import KilnError
from pipeline.engine.fields import Prompt
from pipeline.engine.materialize import link_or_copy
from pipeline.engine.stage import StageContext, Strict
from pipeline.qnn.common import COMPILE, QUANTIZE, QnnStage, genie_params, genie_sources, soc_params

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe


class QnnVerifyParams(Strict):
    text_tokens: int = Field(32, ge=1, description="Evaluation-text tokens (after BOS) prefilled for the numeric check.")
    decode_steps: int = Field(2, ge=0, description="Greedy AR-1 steps after the prefill in the numeric check.")
    min_top1: float = Field(0.9, ge=0, le=1, description="Fail below this top-1 agreement of the simulator's logits "
                            "with the CPU QDQ graph's (is the binary the quantized model?), near-ties forgiven "
                            "(`tie_margin`).")
    tie_margin: float = Field(0.5, ge=0, le=5, description="A position where the simulator's top token is within this "
                              "many logits of the CPU QDQ graph's top counts as agreeing in the `min_top1` check (the "
                              "HTP's fixed-point arithmetic flips near-ties; the strict figure is reported too).")
    min_cosine: float = Field(0.98, ge=-1, le=1, description="Fail below this mean cosine of simulator and CPU QDQ logits.")
    max_top1_drop: float = Field(0.1, ge=0, le=1, description="Fail when the simulator's top-1 agreement with the float "
                                 "model is this much below the CPU QDQ graph's own (the quantization's share).")
    prompts: list[Prompt] = Field(["The capital of France is"], max_length=16, description="Prompts the Genie dialog "
                                  "answers (raw text, no chat template: compared with the float model's greedy answer); "
                                  "empty: no Genie run (at 1B one simulated AR-128 prefill takes tens of minutes).")
    max_new_tokens: int = Field(3, ge=1, description="Tokens Genie generates per prompt.")
    match_tokens: int = Field(2, ge=1, description="Fail unless Genie's answer starts with the float answer's first N tokens.")


class QnnVerify(QnnStage):
    """Simulator numerics of the binaries and the Genie runtime's answers."""

    name = "qnn.verify"
    version = 5  # 2: report.md, shipped as the bundle's report/; 3: no recipe name; 4: timings, Genie's log in info;
    # 5: min_top1 forgives near-ties (tie_margin)
    Params = QnnVerifyParams
    tools = ("python", "torch", "transformers", "onnxruntime", "onnxruntime-qnn", "numpy")
    resource = "heavy"

    requires = ("model", "text", QUANTIZE, COMPILE)

    @classmethod
    def params(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        soc = soc_params(recipe)
        own = recipe.stage_params(cls.name)
        if own["match_tokens"] > own["max_new_tokens"]:
            raise KilnError(f"{recipe.where('stages', cls.name, 'match_tokens')}: stages.{cls.name}.match_tokens "
                            f"({own['match_tokens']}) exceeds max_new_tokens ({own['max_new_tokens']})")
        genie = {k: v for k, v in genie_params(recipe).items() if k not in ("sampler", "ctx_bins")}
        return {**own, "soc_model": soc["soc_model"], "htp_arch": soc["htp_arch"], "model": recipe.model.name,
                "context_length": recipe.spec.context_length, "genie": genie}

    @classmethod
    def sources(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        return genie_sources(recipe)

    @classmethod
    def ships(cls, recipe: Recipe, variant: str = "") -> str | None:
        return "report"  # the simulator figures travel with the bundle

    def run(self, ctx: StageContext) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        p = ctx.params
        tokenizer = AutoTokenizer.from_pretrained(ctx.inputs["model"])
        hf = AutoModelForCausalLM.from_pretrained(ctx.inputs["model"], dtype=torch.float32).eval()
        numerics = simulator_numerics(ctx, hf, tokenizer)
        genie = genie_answers(ctx, hf, tokenizer)
        report = {"label": "x86 HTP simulator (onnxruntime-qnn), not the phone", "numerics": numerics, "genie": genie}
        timings = {"label": "x86 HTP simulator on this host (not the phone)",
                   "numerics_seconds": numerics.pop("simulator_seconds"),
                   "genie": [{k: a.pop(k) for k in ("seconds", "tokens_per_s_simulator")} | {"prompt": a["prompt"]}
                             for a in genie["answers"]]}
        (ctx.out / "verify.json").write_text(json.dumps(report, indent=2) + "\n")
        (ctx.info / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
        (ctx.out / "report.md").write_text(report_md(p["model"], report))
        problems = []
        sim, sim_float, cpu_float = (numerics[k] for k in ("simulator_vs_cpu_qdq", "simulator_vs_float", "cpu_qdq_vs_float"))
        if sim["top1_outside_ties"] < p["min_top1"] or sim["cosine_mean"] < p["min_cosine"]:
            problems.append(f"simulator vs CPU QDQ: top-1 {sim['top1_outside_ties']:.3f} with near-ties of "
                            f"{p['tie_margin']} logits forgiven ({sim['top1_agreement']:.3f} strict; min {p['min_top1']}), "
                            f"cosine {sim['cosine_mean']:.4f} (min {p['min_cosine']})")
        if sim_float["top1_agreement"] < cpu_float["top1_agreement"] - p["max_top1_drop"]:
            problems.append(f"top-1 agreement with the float model: simulator {sim_float['top1_agreement']:.3f}, "
                            f"CPU QDQ {cpu_float['top1_agreement']:.3f} (max drop {p['max_top1_drop']})")
        problems += [f"Genie answered {a['genie']!r} to {a['prompt']!r}; the float model: {a['float']!r}"
                     for a in genie["answers"] if not a["match"]]
        if problems:
            raise KilnError("qnn.verify: " + "; ".join(problems))


def report_md(model: str, report: dict[str, Any]) -> str:
    n = report["numerics"]
    rows = [f"| {k.replace('_', ' ')} | {v['top1_agreement']:.3f} | {v['top1_outside_ties']:.3f} | "
            f"{v['cosine_mean']:.4f} | {v['cosine_min']:.4f} |" for k, v in n.items() if isinstance(v, dict)]
    answers = [f"| {a['prompt']!r} | {a['genie']!r} | {a['float']!r} | {'yes' if a['match'] else 'NO'} | "
               f"{a['genie_tokens']} |" for a in report["genie"]["answers"]]
    return "\n".join([
        f"# {model}: HTP binaries on the x86 simulator ({report['label']})", "",
        f"{n['tokens']} prompt tokens through the widest AR graph, then {n['decode_steps']} greedy AR-1 steps.", "",
        f"Near-ties forgiven: the first model's top token within {n['tie_margin']} logits of the second's top.", "",
        "| logits | top-1 agreement | near-ties forgiven | cosine mean | cosine min |", "|---|---:|---:|---:|---:|",
        *rows, "",
        f"Genie {report['genie']['api']} (libGenie x86, the bundle's config over the unshared binaries, greedy):", "",
        "| prompt | Genie | float model | match | tokens |", "|---|---|---|---|---:|", *answers, ""])


def compare_logits(a: Any, b: Any, tie_margin: float) -> dict[str, float]:
    """Logits `a` against the reference `b`, row by row: top-1 agreement, the same forgiving a
    near-tie (b's logit of a's top token within `tie_margin` of b's top), and cosine."""
    import torch

    a, b = a.float(), b.float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    top = a.argmax(-1)
    picked = b.gather(-1, top.unsqueeze(-1)).squeeze(-1)
    return {"top1_agreement": float((top == b.argmax(-1)).float().mean()),
            "top1_outside_ties": float((picked >= b.max(-1).values - tie_margin).float().mean()),
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


def _squeezed(text: str) -> str:
    """Text without whitespace: tokenizers without a decoder (word-level) join tokens differently."""
    return "".join(text.split())


def htp_step(parts: list[tuple[Any, dict[str, Any]]], names_in: list[str], names_out: list[str]) -> Any:
    """A step function (adapted_llama.Step) over the simulator sessions of one AR graph's parts, in
    order, with quantized device I/O: the step's float inputs are quantized for the parts that read
    them, and what a part hands the next (the residual stream) passes on raw, as Genie passes it."""
    import numpy as np
    import torch

    def to_device(t: dict[str, Any], value: np.ndarray) -> np.ndarray:
        if t["scale"] is None:
            return value.astype(t["dtype"])
        info = np.iinfo(t["dtype"])
        return np.clip(np.rint(value / t["scale"]) + t["zero_point"], info.min, info.max).astype(t["dtype"])

    def step(inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        given = dict(zip(names_in, inputs, strict=True))
        raw: dict[str, np.ndarray] = {}
        floats: dict[str, torch.Tensor] = {}
        for session, io in parts:
            feed = {t["name"]: raw[t["name"]] if t["name"] in raw else to_device(t, given[t["name"]].numpy())
                    for t in io["inputs"]}
            for t, o in zip(io["outputs"], session.run([t["name"] for t in io["outputs"]], feed), strict=True):
                raw[t["name"]] = o
                floats[t["name"]] = torch.from_numpy((o.astype(np.float32) - t["zero_point"]) * t["scale"]
                                                     if t["scale"] else o)
        return [floats[n] for n in names_out]
    return step


def ar_parts(io: dict[str, Any]) -> dict[int, list[str]]:
    """{AR length: its graphs, part 1 first}, widest AR first (io.json's order)."""
    out: dict[int, list[str]] = {}
    for graph, g in sorted(io.items(), key=lambda kv: (-kv[1]["ar"], kv[1].get("part", 1))):
        out.setdefault(g["ar"], []).append(graph)
    return out


def simulator_numerics(ctx: StageContext, hf: Any, tokenizer: Any) -> dict[str, Any]:
    import torch

    from pipeline.qnn.adapted_llama import io_names, prefill_and_decode
    from pipeline.qnn.onnx_check import ort_session, ort_step
    from pipeline.qnn.ort_qnn import simulator_session

    p = ctx.params
    compiled, quantized = ctx.inputs[COMPILE], ctx.inputs[QUANTIZE]
    io = json.loads((compiled / "io.json").read_text())
    text = (ctx.inputs["text"] / "evaluation.txt").read_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:p["text_tokens"]]
    ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids
    names_in, names_out = io_names(hf.config.num_hidden_layers)
    graphs_of = ar_parts(io)
    for ar, graphs in graphs_of.items():
        # the parts of one AR graph read the adapted model's inputs and together write its outputs
        read = {t["name"] for g in graphs for t in io[g]["inputs"]}
        written = {t["name"] for g in graphs for t in io[g]["outputs"]}
        if not read - written <= set(names_in) or not set(names_out) <= written:
            raise KilnError(f"qnn.verify: AR-{ar}: device I/O in io.json is not the adapted model's I/O")

    # one kind of session at a time (at 1B each holds the weights once more): the simulator's,
    # then the CPU's over the QDQ graphs, uncut
    def simulator_steps() -> dict[int, Any]:
        return {ar: htp_step([(simulator_session(compiled / "unshared" / f"{g}.onnx", p["soc_model"], p["htp_arch"]),
                               io[g]) for g in graphs], names_in, names_out) for ar, graphs in graphs_of.items()}

    def cpu_steps() -> dict[int, Any]:
        return {ar: ort_step(ort_session(quantized / f"{io[graphs[0]].get('whole', graphs[0])}.qdq.onnx"),
                             names_in, names_out) for ar, graphs in graphs_of.items()}

    t0 = time.monotonic()
    sim_logits, generated = prefill_and_decode(simulator_steps(), hf, ids, p["decode_steps"], p["context_length"])
    seconds = time.monotonic() - t0
    cpu_logits, _ = prefill_and_decode(cpu_steps(), hf, ids, p["decode_steps"], p["context_length"])
    with torch.no_grad():
        float_logits = hf(torch.tensor([ids + generated])).logits[0]
    float_logits = float_logits[:sim_logits.shape[0]]
    margin = p["tie_margin"]
    result = {"tokens": len(ids), "decode_steps": p["decode_steps"], "generated": tokenizer.decode(generated),
              "simulator_seconds": round(seconds, 1), "tie_margin": margin,
              "simulator_vs_float": compare_logits(sim_logits, float_logits, margin),
              "simulator_vs_cpu_qdq": compare_logits(sim_logits, cpu_logits, margin),
              "cpu_qdq_vs_float": compare_logits(cpu_logits, float_logits, margin)}
    ctx.log.info(f"{len(ids)} prompt tokens + {p['decode_steps']} decode steps ({seconds:.0f}s simulated): " + "; ".join(
        f"{k.replace('_', ' ')}: top-1 {v['top1_agreement']:.3f} ({v['top1_outside_ties']:.3f} near-ties forgiven), "
        f"cosine {v['cosine_mean']:.4f}"
        for k, v in result.items() if isinstance(v, dict)))
    return result


def genie_answers(ctx: StageContext, hf: Any, tokenizer: Any) -> dict[str, Any]:
    import torch

    from pipeline.qnn.genie import Dialog, api_version, genie_values, render_configs

    p = ctx.params
    compiled = ctx.inputs[COMPILE]
    io = json.loads((compiled / "io.json").read_text())
    work = ctx.out / "genie"
    work.mkdir()
    bins = [f"{g}_qnn.bin" for g, _ in sorted(io.items(), key=lambda kv: (kv[1].get("part", 1), -kv[1]["ar"]))]
    for name in bins:
        link_or_copy(compiled / "unshared" / name, work / name)
    link_or_copy(ctx.inputs["model"] / "tokenizer.json", work / "tokenizer.json")
    greedy = {"seed": 0, "temp": 1.0, "top_k": 1, "top_p": 1.0}
    values = genie_values({**p["genie"], "sampler": greedy}, ctx.inputs["model"], bins, weight_sharing=False)
    dialog, ext = render_configs(p["genie"]["sdk"], values)  # Dialog() runs Genie's schema check on it
    (work / "htp_backend_ext_config.json").write_text(json.dumps(ext, indent=2) + "\n")
    (work / "dialog.json").write_text(json.dumps(dialog, indent=2) + "\n")

    answers = []
    for prompt in p["prompts"]:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=p["max_new_tokens"], do_sample=False)
        float_ids = out[0, len(ids):].tolist()
        t0 = time.monotonic()
        with Dialog(dialog, work) as d:
            text, tokens = d.query(prompt, p["max_new_tokens"])
        seconds = time.monotonic() - t0
        expected = tokenizer.decode(float_ids[:p["match_tokens"]])
        answers.append({"prompt": prompt, "genie": text, "float": tokenizer.decode(float_ids),
                        "match": _squeezed(expected) != "" and _squeezed(text).startswith(_squeezed(expected)),
                        "genie_tokens": tokens, "seconds": round(seconds, 1),
                        "tokens_per_s_simulator": round(tokens / seconds, 3)})
        (ctx.info / "genie.log").open("a").write(f"--- {prompt!r}\n{d.log}\n")
        ctx.log.info(f"Genie (simulator): {prompt!r} → {text!r}; float: {answers[-1]['float']!r}")
    for name in bins + ["tokenizer.json"]:
        (work / name).unlink()  # the stage output keeps only configs and logs
    return {"api": api_version(), "config": "genie/dialog.json", "answers": answers}
