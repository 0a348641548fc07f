"""Quantization accuracy table on the real SmolLM2 (issue 4): perplexity on held-out text for
float and for W8A16 / W4A16 per-channel / W4A16 blocks of 128 and of 64 (+ KV8, float16
outliers), each with RTN, SeqMSE and GPTQ — through the quantize stage's own code (pipeline/qnn/quant/flow.py):
the same weight PTQ, the same calibrated sim of the AR-128 graph, the same evaluation.

Not a speed benchmark: it prints a markdown table. Needs the recipe's model, text and
AR-128 export built first:
    .venv/bin/doit recipe=smollm2_135m_sm8750 smollm2_135m_sm8750:qnn.export@ar128
    .venv/bin/python bench/ppl_table.py            # ~30 min on 2 CPU cores
The QDQ ONNX itself is evaluated by the stage (`quantize.json`: ppl_qdq vs ppl_sim).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMES = {  # name -> (scheme file, weight overrides)
    "W8A16 per-channel + KV8": ("w8a16_kv8", {}),
    "W4A16 per-channel + KV8": ("w4a16_kv8", {"granularity": "per-channel", "block_size": None}),
    "W4A16 blocks of 128 + KV8": ("w4a16_kv8", {"block_size": 128}),
    "W4A16 blocks of 64 + KV8": ("w4a16_kv8", {}),
}


def main() -> None:
    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.qnn.adapted_llama import AdaptedLlama, ar_perplexity, torch_step
    from pipeline.qnn.quant import qdq
    from pipeline.qnn.quant.flow import calibrated_sim, quantize_model
    from pipeline.qnn.quantize import QnnQuantize, calibration_batches, graph_file, scheme_params
    from pipeline.recipe.schema import SchemeSpec
    from pipeline.registry import load_recipe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="smollm2_135m_sm8750")
    ap.add_argument("--algorithms", default="rtn,seqmse,gptq")
    ap.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated labels from SCHEMES")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where SeqMSE/GPTQ run")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe)
    ws = recipe.settings.artifacts / args.recipe
    p = QnnQuantize.params(recipe)
    context = p["context_length"]
    ar = max(recipe.spec.ar_lengths)
    tokenizer = AutoTokenizer.from_pretrained(ws / "model")
    eval_ids = tokenizer((ws / "text" / "evaluation.txt").read_text(), add_special_tokens=False)["input_ids"]
    weight_prompts = [b[:context] for b in calibration_batches(
        tokenizer, (ws / "text" / "calibration.txt").read_text(),
        max(p["calibration_samples"], p["weight_calibration_samples"]), p["calibration_tokens"])]
    prompts, weight_prompts = weight_prompts[:p["calibration_samples"]], weight_prompts[:p["weight_calibration_samples"]]
    shapes = {i.name: tuple(i.dims) for i in
              qdq.load_structure(graph_file(ws / f"qnn.export@ar{ar}")).graph.initializer}

    def load():
        return AutoModelForCausalLM.from_pretrained(ws / "model", dtype=torch.float32).eval()

    def ppl(hf, step) -> float:
        return ar_perplexity(step, hf, eval_ids, ar, context, p["eval_windows"])

    hf = load()
    base = ppl(hf, torch_step(AdaptedLlama(hf).eval()))
    print(f"float: {base:.4f}", flush=True)
    rows = [("float", "—", base, 0.0)]
    for label in args.schemes.split(","):
        scheme_name, weights = SCHEMES[label]
        spec = SchemeSpec(name=scheme_name, **yaml.safe_load((recipe.settings.recipes_dir / "schemes" /
                                                              f"{scheme_name}.yaml").read_text()))
        scheme = scheme_params(spec)
        scheme = copy.deepcopy(scheme)
        scheme["weights"].update(weights)
        for algorithm in args.algorithms.split(","):
            t0 = time.monotonic()
            hf = load()
            _, params, seconds = quantize_model(hf, scheme, algorithm, weight_prompts, shapes, args.device)
            value = ppl(hf, calibrated_sim(hf, params, scheme, prompts, ar, context).step())
            rows.append((label, algorithm, value, seconds))
            print(f"{label} {algorithm}: {value:.4f} ({100 * (value / base - 1):+.2f}%), weights {seconds:.0f}s, "
                  f"total {time.monotonic() - t0:.0f}s", flush=True)
    print(f"\nPerplexity, {args.recipe}: {context * p['eval_windows']} held-out tokens, AR-{ar} graph step by step "
          f"(torch sim: weights, activations, KV)\n")
    print(f"| scheme | algorithm | PPL | Δ vs float | weight PTQ (s, {args.device}) |\n|---|---|---:|---:|---:|")
    for label, algorithm, value, seconds in rows:
        delta = "—" if label == "float" else f"{100 * (value / base - 1):+.2f}%"
        print(f"| {label} | {algorithm} | {value:.4f} | {delta} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
