"""The quantize stage's torch half, shared with bench/ppl_table.py: weight PTQ of the HF model
into the ONNX initializers' layout, then the calibrated sim of the adapted model."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.engine.progress import progress
from pipeline.qnn.adapted_llama import AdaptedLlama, hf_names, run_steps
from pipeline.qnn.quant import qdq
from pipeline.qnn.quant.coded import hold_as_codes
from pipeline.qnn.quant.model import onnx_params, quantize_weights
from pipeline.qnn.quant.sim import QuantSim


def pick_device(choice: str) -> str:
    return "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"


def quantize_model(hf: torch.nn.Module, scheme: dict[str, Any], algorithm: str, prompts: list[list[int]],
                   shapes: dict[str, tuple[int, ...]], device: str, checkpoint: Path | None = None
                   ) -> tuple[list[dict[str, Any]], dict[str, qdq.QuantParam], float]:
    """Quantize `hf`'s weights in place, calibrated on `prompts` (resuming from `checkpoint`'s
    per-layer state when given); return (report rows, QuantParams by ONNX name, seconds)."""
    t0 = time.monotonic()
    rows = quantize_weights(hf, scheme, algorithm, [torch.tensor([b]) for b in prompts], device, checkpoint)
    params = onnx_params(hf, scheme, rows, hf_names(hf.config.num_hidden_layers), shapes)
    return rows, params, time.monotonic() - t0


def calibrated_sim(hf: torch.nn.Module, params: dict[str, qdq.QuantParam], scheme: dict[str, Any],
                   prompts: list[list[int]], ar: int, context: int) -> QuantSim:
    """The adapted model on exactly the QDQ weights (held as codes: quant/coded.py), its
    activation/KV quantizers calibrated on `prompts` run through the AR graph step by step."""
    model = AdaptedLlama(hf).eval()
    for name in hold_as_codes(model, params):  # the rest: norm weights and the like
        param = model.get_parameter(name)
        param.data = torch.from_numpy(qdq.dequantize(params[name])).reshape(param.shape)
    # the HF model's copies go (its forward pass is not run again: stepping reads only its config
    # and RoPE tables): the sim now holds the quantized weights as codes alone, 5 GB less at 1B
    names = hf_names(hf.config.num_hidden_layers)
    for name in params:
        hf.get_parameter(names[name]).data = torch.empty(0)
    sim = QuantSim(model, scheme["activations"], scheme["kv_cache"], float16_ratio(scheme))
    for prompt in progress(prompts, "sim ranges", "prompt"):
        run_steps(sim.step(), hf, prompt, ar, context)
    sim.freeze()
    return sim


def float16_ratio(scheme: dict[str, Any]) -> float:
    return scheme.get("float16_outlier_ratio") or math.inf
