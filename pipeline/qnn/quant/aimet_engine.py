"""AIMET as the quantize stage's engine (a scheme's `engine: aimet`): aimet-onnx's
QuantizationSimModel on the float AR graph computes the encodings; Kiln reads them back,
validates them like its own and builds the same QDQ ONNX from them.

What AIMET does here (aimet-onnx 2.42; docs/qualcomm.md#aimet):
- weights on the scheme's grid (`set_param_type` with a per-tensor / per-channel / blockwise
  QSpec), activations on `activations.bits`, min-max ranges (`rtn`) or AIMET's own Sequential
  MSE (`seqmse`, run before the ranges as AIMET's docs order it);
- `configure_llm` ties each past_*_in quantizer to its past_*_out one and sets them to
  `kv_cache.bits` (Genie copies KV bytes raw). Its topology is built from Kiln's own I/O names:
  `analyze_llm_topology` does not recognise the adapted graph's RMSNorm (Pow/ReduceMean/Sqrt/Div);
- calibration runs the real prompts through the AR graph step by step, as on the device.

AIMET quantizes an embedding table (a Gather's data) and a norm gamma (a Mul's constant) with
an activation quantizer (16-bit asymmetric per-tensor, which HTP accepts for gammas) and lists
them under activation_encodings; Kiln moves them to param encodings, where qairt-converter
looks for initializers. Scheme overrides reach AIMET's Conv/Gemm/MatMul weights only.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx
import torch

from pipeline.engine.errors import KilnError
from pipeline.qnn.adapted_llama import Step
from pipeline.qnn.onnx_check import ort_step
from pipeline.qnn.quant import qdq
from pipeline.qnn.quant.encodings import Encoding, parse_v1
from pipeline.qnn.quant.grid import Grid
from pipeline.qnn.quant.model import quant_param

ALGORITHMS = ("rtn", "seqmse")


def _qspec(spec: dict[str, Any]):
    from aimet_onnx.defs import QSpec

    dtype = f"int{spec['bits']}"
    symmetric = spec.get("symmetric", True)
    if spec["granularity"] == "per-block":
        return QSpec.blockwise(dtype, spec["block_size"], symmetric=symmetric)
    if spec["granularity"] == "per-channel":
        return QSpec.per_channel(dtype, symmetric=symmetric)
    return QSpec.per_tensor(dtype, symmetric=symmetric)


def _weighted_nodes(model: onnx.ModelProto) -> dict[str, str]:
    """Conv/Gemm/MatMul node name -> its weight initializer."""
    inits = {i.name for i in model.graph.initializer}
    return {n.name: n.input[1] for n in model.graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in inits}


def aimet_encodings(model: onnx.ModelProto, scheme: dict[str, Any], algorithm: str, hf_name: Callable[[str], str],
                    names_in: list[str], names_out: list[str], drive: Callable[[Step], list[Any]],
                    feeds: list[dict[str, Any]], scratch: Path) -> tuple[dict[str, Any], Step]:
    """AIMET's encodings document (1.0.0) for the float graph `model` (weights loaded; AIMET
    rewrites it) and a step function of its sim.

    `drive(step)` runs the calibration prompts through a step function; `feeds` are the float
    graph's inputs on those prompts (SeqMSE's data); `hf_name` maps an initializer to the HF
    parameter name the scheme's override patterns match."""
    from aimet_onnx.llm_configurator.llm_configurator import configure_llm
    from aimet_onnx.llm_topology.topology_types import LlmTopology
    from aimet_onnx.quantsim import QuantizationSimModel, set_param_type
    from aimet_onnx.sequential_mse.seq_mse import apply_seq_mse

    if algorithm not in ALGORITHMS:
        raise KilnError(f"the aimet engine runs algorithms {', '.join(ALGORITHMS)}, not {algorithm!r}")
    weighted = _weighted_nodes(model)
    sim = QuantizationSimModel(model, param_type=f"int{scheme['weights']['bits']}",
                               activation_type=f"int{min(scheme['activations'], 16)}", quant_scheme="min_max")
    set_param_type(sim, _qspec(scheme["weights"]), op_types=("Conv", "Gemm", "MatMul"), strict=False)
    for rule in reversed(scheme.get("overrides", [])):  # first match wins: apply it last
        nodes = {n for n, w in weighted.items() if re.search(rule["match"], hf_name(w))}
        if rule.get("weights") and nodes:
            set_param_type(sim, _qspec(rule["weights"]), nodes_to_include=nodes, strict=False)

    def kv(kind: str, names: list[str]) -> list[str]:
        return [n for n in names if n.startswith(f"past_{kind}_")]

    topology = LlmTopology(past_key_input_names=kv("key", names_in), past_key_output_names=kv("key", names_out),
                           past_value_input_names=kv("value", names_in),
                           past_value_output_names=kv("value", names_out))
    configure_llm(sim, topology, kv_cache_type=f"int{scheme['kv_cache']}" if scheme["kv_cache"] < 32 else None)
    if algorithm == "seqmse":
        apply_seq_mse(sim, feeds)
    sim.compute_encodings(lambda session: drive(ort_step(session, names_in, names_out)))
    scratch.mkdir(parents=True, exist_ok=True)
    sim.export(str(scratch), "aimet", export_model=False, encoding_version="1.0.0")
    doc = json.loads((scratch / "aimet.encodings").read_text())

    def step(inputs):  # reads `sim` at each call: its quantizers back the session's custom ops
        return ort_step(sim.session, names_in, names_out)(inputs)

    return doc, step


def params_from_encodings(model: onnx.ModelProto, encodings: dict[str, Encoding]) -> dict[str, qdq.QuantParam]:
    """QuantParams of `model`'s initializers (weights loaded) on the grids `encodings` give."""
    inits = {i.name: i for i in model.graph.initializer}
    params = {}
    for name, e in encodings.items():
        if name not in inits:
            raise KilnError(f"encodings: param {name!r} is not an initializer of the graph")
        w = torch.from_numpy(onnx.numpy_helper.to_array(inits[name]).copy()).float()
        granularity = "per-block" if e.block_size else "per-channel" if len(e.scale) > 1 else "per-tensor"
        grid = Grid(e.bits, granularity, e.block_size, e.symmetric)
        groups = 1 if granularity == "per-tensor" else w.shape[0]
        scale = torch.tensor(e.scale, dtype=torch.float32).reshape(groups, -1, 1)
        zero = (grid.qmin - torch.tensor(e.offset, dtype=torch.float32)).reshape(scale.shape)
        params[name] = quant_param(name, w, grid, scale, zero, tuple(w.shape))
    return params


def read_document(doc: dict[str, Any], initializers: set[str], where: str
                  ) -> tuple[dict[str, Encoding], dict[str, Encoding]]:
    """Activation and param encodings of an AIMET 1.0.0 document: encodings of `initializers`
    listed as activations become params; past_*_out get their tied past_*_in encoding (AIMET
    lists one tensor per tied quantizer)."""
    acts, params = parse_v1(doc, where)
    params.update({n: acts.pop(n) for n in [n for n in acts if n in initializers]})
    for name in [n for n in acts if n.startswith("past_") and n.endswith("_in")]:
        acts.setdefault(name[:-3] + "_out", replace(acts[name], name=name[:-3] + "_out"))
    return acts, params
