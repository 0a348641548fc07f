"""Run an exported AR graph step by step in onnxruntime and compare with the HF model."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from .adapted_llama import advance_past, step_inputs


def compare_with_hf(hf: torch.nn.Module, onnx_path: Path, names_in: list[str], names_out: list[str],
                    ids: list[int], ar: int, context: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Feed `ids` through the graph in steps of `ar` tokens; return (figures, first step's test vectors)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        reference = hf(torch.tensor([ids])).logits[0].numpy()
    got, past, vectors = [], None, {}
    for start in range(0, len(ids), ar):
        chunk = ids[start:start + ar]
        inputs = step_inputs(hf, chunk, start, ar, context, past)
        feed = {n: t.numpy() for n, t in zip(names_in, inputs)}
        outputs = session.run(names_out, feed)
        if not vectors:
            vectors = {**{f"in.{k}": v for k, v in feed.items()}, **{f"out.{k}": v for k, v in zip(names_out, outputs)}}
        got.append(outputs[0][0, :len(chunk)])
        past = advance_past(list(inputs[4:]), [torch.from_numpy(o) for o in outputs[1:]], len(chunk))
    logits = np.concatenate(got)
    return {
        "tokens": len(ids),
        "max_abs_logit_diff": float(np.abs(logits - reference).max()),
        "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
    }, vectors
