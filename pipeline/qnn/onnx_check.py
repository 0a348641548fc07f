"""Run exported AR graphs in onnxruntime: a step function for `run_steps`, and the check
of a float graph against the HF model."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from pipeline.qnn.adapted_llama import Step, release_weights, run_steps


def ort_session(onnx_path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def ort_step(session: ort.InferenceSession, names_in: list[str], names_out: list[str],
             vectors: dict[str, np.ndarray] | None = None) -> Step:
    """One graph call; the first call's feeds and outputs go to `vectors` (test vectors) if given."""
    def step(inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        feed = {n: t.numpy() for n, t in zip(names_in, inputs)}
        outputs = session.run(names_out, feed)
        if vectors is not None and not vectors:
            vectors.update({f"in.{k}": v for k, v in feed.items()})
            vectors.update({f"out.{k}": v for k, v in zip(names_out, outputs)})
        return [torch.from_numpy(o) for o in outputs]
    return step


def compare_with_hf(hf: torch.nn.Module, onnx_path: Path, names_in: list[str], names_out: list[str],
                    ids: list[int], ar: int, context: int, free_hf: bool = False
                    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Feed `ids` through the graph in steps of `ar` tokens; return (figures, first step's test vectors).
    `free_hf` empties `hf`'s parameters once its logits are computed (the graph's steps
    need only its config and RoPE tables): the float model and the onnxruntime session of the same
    weights are never in memory together."""
    with torch.no_grad():
        reference = hf(torch.tensor([ids])).logits[0].numpy()
    if free_hf:
        release_weights(hf)
    vectors: dict[str, np.ndarray] = {}
    logits = run_steps(ort_step(ort_session(onnx_path), names_in, names_out, vectors), hf, ids, ar, context,
                       label=f"onnxruntime vs HF (AR-{ar})").numpy()
    return {
        "tokens": len(ids),
        "max_abs_logit_diff": float(np.abs(logits - reference).max()),
        "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
    }, vectors
