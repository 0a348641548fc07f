"""QDQ ONNX from a float AR graph: QuantizeLinear/DequantizeLinear pairs that carry exactly
Kiln's encodings (the weights' from the PTQ algorithm, the activations' from calibration,
the KV cache's shared one), so the graph in onnxruntime computes what the device will.

Why not onnxruntime.quantization.quantize: it computes weight scales itself (min-max), has
no per-block Conv weights and cannot pin past_*_in/_out to one shared KV encoding; here the
graph transform is small and the numbers come from Kiln's algorithms.

The output uses opset 21 (blocked DequantizeLinear for per-block int4, uint16 Q/DQ).
"""
from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper, version_converter

from pipeline.engine.materialize import link_tree
from pipeline.qnn.adapted_llama import Step
from pipeline.qnn.quant.encodings import Encoding
from pipeline.qnn.quant.observer import Observer

OPSET = 21
# Ops whose float outputs get an activation encoding; data movement (Reshape, Transpose,
# Slice, Unsqueeze, Gather of a computed tensor) keeps its input's encoding, as on HTP.
# RMSNorm runs as one op on HTP (qairt-converter fuses the pattern), so only its output has an
# encoding: its x² of a BOS token reaches ~6e8, and a 16-bit grid over that range zeroes every
# other token's x², which then divides by sqrt(eps).
FUSED_SCOPE = re.compile(r"^(.*/norm\d*/)")
COMPUTE_OPS = {"Conv", "MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Pow", "ReduceMean", "Sqrt", "Reciprocal",
               "Softmax", "Sigmoid", "Concat", "Neg"}


@dataclass(frozen=True)
class QuantParam:
    """A weight as integer codes on its grid, ready for a DequantizeLinear."""

    encoding: Encoding
    codes: np.ndarray          # same shape as the float initializer
    scale: np.ndarray          # scalar, [out] (axis 0) or blocked [out, n_blocks, ...] (axis 1)
    zero_point: np.ndarray     # same shape as scale
    axis: int | None
    block_size: int | None = None


def load_structure(path: Path) -> onnx.ModelProto:
    """The graph without its weight data, Identity-of-initializer nodes folded away (the
    exporter emits them for weights that happen to be equal)."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity" and n.input[0] in inits}
    keep = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in keep:
        node.input[:] = [alias.get(i, i) for i in node.input]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def conv_weights(model: onnx.ModelProto) -> set[str]:
    """Initializers that are Conv weights (the projections of the adapted graph)."""
    return {n.input[1] for n in model.graph.node if n.op_type == "Conv"}


def load_weights(model: onnx.ModelProto, base: Path, skip: set[str] | dict | None = None) -> None:
    """Read external weight data into `model` (but the initializers named in `skip`). onnx's own
    loader refuses files with several hard links, and store entries are hard-linked into
    workspaces, hence this reader; a location must be a plain file name beside the model."""
    for t in model.graph.initializer:
        if not external_data_helper.uses_external_data(t) or (skip and t.name in skip):
            continue
        info = {e.key: e.value for e in t.external_data}
        if Path(info["location"]).name != info["location"]:
            raise ValueError(f"{base}: initializer {t.name}: external data location {info['location']!r} "
                             "is not a file beside the model")
        with open(base / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            t.raw_data = f.read(int(info["length"])) if "length" in info else f.read()
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT


def activation_tensors(model: onnx.ModelProto) -> list[str]:
    """Float tensors that get an activation encoding: float graph inputs, outputs of compute
    ops and of embedding lookups, and the float graph outputs."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if types.get(i.name) == TensorProto.FLOAT]
    last_in_scope = {m.group(1): n.name for n in model.graph.node if (m := FUSED_SCOPE.match(n.name))}
    for node in model.graph.node:
        scope = FUSED_SCOPE.match(node.name)
        if scope and last_in_scope[scope.group(1)] != node.name:
            continue
        if node.op_type in COMPUTE_OPS or (node.op_type == "Gather" and node.input[0] in inits):
            names += [o for o in node.output if types.get(o) == TensorProto.FLOAT]
    names += [o.name for o in model.graph.output if types.get(o.name) == TensorProto.FLOAT and o.name not in names]
    return list(dict.fromkeys(names))


# what `with_reductions` gives each tensor, as scalar graph outputs `<tensor>__<kind>`
REDUCED = (("min", TensorProto.FLOAT), ("max", TensorProto.FLOAT), ("abs_sum", TensorProto.DOUBLE),
           ("count", TensorProto.INT64))


def with_reductions(model: onnx.ModelProto, tensors: list[str]) -> list[str]:
    """Give `model` scalar outputs `<t>__min`, `__max`, `__abs_sum` (float64) and `__count` for
    every tensor `t` of `tensors` that a node makes; return their names. Each tensor's reductions
    come right after the node that makes it, so that onnxruntime with `calibration_options` runs
    them at once: reductions at the end would keep every activation alive until then (at 1B and
    context 4096 one AR-128 step's attention scores alone are 16 layers x 67 MB per kind)."""
    made = {t for n in model.graph.node for t in n.output}
    reduced = [t for t in tensors if t in made]
    wanted = set(reduced)
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        nodes += [n for t in node.output if t in wanted for n in _reductions(t)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    stats = [(f"{t}__{kind}", dtype) for t in reduced for kind, dtype in REDUCED]
    model.graph.output.extend(helper.make_tensor_value_info(name, dtype, []) for name, dtype in stats)
    return [name for name, _ in stats]


def calibration_options() -> Any:
    """onnxruntime session options for a `with_reductions` graph: priority-based order (Kahn's sort,
    ties by node index) runs each tensor's reductions as soon as it is made; the default order
    (depth-first from the outputs) left them at the end of the graph. No CPU arena and no memory
    pattern: both keep the step's largest buffers (every weight's DequantizeLinear output, the
    attention scores) reserved; measured on the 1B AR-128 graph at context 4096: 14.0 -> 7.2 GB."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    return options


def calibrate_ranges(src: Path, tensors: list[str], names_in: list[str], names_out: list[str],
                     drive: Callable[[Step], None], scratch: Path) -> dict[str, Observer]:
    """Statistics of `tensors` over the calibration runs `drive` makes with the step function
    it is given (graph `src`). The graph reduces each tensor itself (`with_reductions`) and
    returns only those scalars: at context 4096 a step's activations, every attention score among
    them, are gigabytes; graph inputs are reduced here."""
    import onnxruntime as ort
    import torch

    model = onnx.load(str(src), load_external_data=False)
    stats = with_reductions(model, [t for t in tensors if t not in names_in])
    # beside its weight data: onnxruntime refuses data outside the model's directory, symlinks too
    shutil.rmtree(scratch, ignore_errors=True)
    link_tree(src.parent, scratch, methods=("reflink", "hardlink", "copy"))
    augmented = scratch / "calibration.onnx"
    onnx.save_model(model, str(augmented))
    session = ort.InferenceSession(str(augmented), calibration_options(), providers=["CPUExecutionProvider"])
    observers = {t: Observer() for t in tensors}

    def step(inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        feed = {n: t.numpy() for n, t in zip(names_in, inputs)}
        values = session.run(names_out + stats, feed)
        seen = dict(zip(stats, values[len(names_out):]))
        for t in tensors:
            if t in feed:
                observers[t].update(feed[t])
            else:
                observers[t].add(float(seen[f"{t}__min"]), float(seen[f"{t}__max"]),
                                 float(seen[f"{t}__abs_sum"]), int(seen[f"{t}__count"]))
        return [torch.from_numpy(v) for v in values[:len(names_out)]]

    drive(step)
    shutil.rmtree(scratch)
    return observers


def _reductions(t: str) -> list[onnx.NodeProto]:
    """min, max, sum |x| (in float64) and element count of tensor `t`, as scalar outputs."""
    return [helper.make_node("ReduceMin", [t], [f"{t}__min"], keepdims=0, name=f"{t}__ReduceMin"),
            helper.make_node("ReduceMax", [t], [f"{t}__max"], keepdims=0, name=f"{t}__ReduceMax"),
            helper.make_node("Abs", [t], [f"{t}__abs"], name=f"{t}__Abs"),
            helper.make_node("Cast", [f"{t}__abs"], [f"{t}__abs64"], to=TensorProto.DOUBLE, name=f"{t}__Cast"),
            helper.make_node("ReduceSum", [f"{t}__abs64"], [f"{t}__abs_sum"], keepdims=0, name=f"{t}__ReduceSum"),
            helper.make_node("Size", [t], [f"{t}__count"], name=f"{t}__Size")]


def _int_tensor(name: str, values: np.ndarray, bits: int, signed: bool) -> TensorProto:
    if bits == 4:  # packed two per byte, low nibble first (ONNX INT4/UINT4)
        flat = values.astype(np.int8).ravel()
        if flat.size % 2:
            flat = np.append(flat, 0)
        packed = ((flat[0::2] & 0xF) | ((flat[1::2] & 0xF) << 4)).astype(np.uint8)
        return helper.make_tensor(name, TensorProto.INT4 if signed else TensorProto.UINT4, values.shape,
                                  packed.tobytes(), raw=True)
    dtype = {(8, True): np.int8, (8, False): np.uint8, (16, True): np.int16, (16, False): np.uint16}[(bits, signed)]
    return numpy_helper.from_array(values.astype(dtype), name)


def _act_qdq(tensor: str, src: str, dst: str, e: Encoding) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    if e.is_float:  # float16 (mixed precision): round through half
        return [helper.make_node("Cast", [src], [f"{tensor}_fp16"], to=TensorProto.FLOAT16, name=f"{tensor}_ToFp16"),
                helper.make_node("Cast", [f"{tensor}_fp16"], [dst], to=TensorProto.FLOAT, name=f"{tensor}_FromFp16")], []
    zp = -e.offset[0]
    inits = [numpy_helper.from_array(np.array(e.scale[0], np.float32), f"{tensor}_qscale"),
             _int_tensor(f"{tensor}_qzp", np.array(zp), e.bits, signed=False)]
    nodes = [helper.make_node("QuantizeLinear", [src, f"{tensor}_qscale", f"{tensor}_qzp"], [f"{tensor}_q"],
                              name=f"{tensor}_Q"),
             helper.make_node("DequantizeLinear", [f"{tensor}_q", f"{tensor}_qscale", f"{tensor}_qzp"], [dst],
                              name=f"{tensor}_DQ")]
    return nodes, inits


def _param_dq(name: str, p: QuantParam) -> tuple[onnx.NodeProto, list[TensorProto]]:
    signed = p.encoding.symmetric
    inits = [_int_tensor(f"{name}_w", p.codes, p.encoding.bits, signed),
             numpy_helper.from_array(p.scale.astype(np.float32), f"{name}_wscale"),
             _int_tensor(f"{name}_wzp", p.zero_point, p.encoding.bits, signed)]
    attrs = {} if p.axis is None else {"axis": p.axis}
    if p.block_size:
        attrs["block_size"] = p.block_size
    node = helper.make_node("DequantizeLinear", [f"{name}_w", f"{name}_wscale", f"{name}_wzp"], [name],
                            name=f"{name}_DQ", **attrs)
    return node, inits


def build_qdq(src: Path, dst: Path, graph_name: str, params: dict[str, QuantParam],
              activations: dict[str, Encoding]) -> None:
    """Write the QDQ model of `src` to `dst` (+ `<dst stem>.data`)."""
    model = load_structure(src)
    load_weights(model, src.parent, skip=params)  # the quantized weights replace those: never read them
    model = version_converter.convert_version(model, OPSET)
    model.ir_version = 10  # INT4 needs IR 10; onnxruntime 1.31 reads up to 13
    g = model.graph
    kept = [i for i in g.initializer if i.name not in params]
    new_inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    for name, p in params.items():
        node, inits = _param_dq(name, p)
        nodes.append(node)
        new_inits += inits

    graph_inputs = {i.name for i in g.input}
    graph_outputs = {o.name for o in g.output}
    renamed: dict[str, str] = {}  # graph-input activations: consumers read the DQ output
    for t in activations:
        if t in graph_inputs:
            qdq, inits = _act_qdq(t, t, f"{t}_dq", activations[t])
            nodes += qdq
            new_inits += inits
            renamed[t] = f"{t}_dq"
    for node in g.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
        outs = list(node.output)
        tail: list[onnx.NodeProto] = []
        for k, o in enumerate(outs):
            if o in activations and o not in graph_inputs:
                # the producer writes <o>_float; Q/DQ give back <o>, which every consumer (and a
                # graph output) reads: one tensor, one encoding, as on the device
                outs[k] = f"{o}_float"
                qdq, inits = _act_qdq(o, f"{o}_float", o, activations[o])
                tail += qdq
                new_inits += inits
        node.output[:] = outs
        nodes.append(node)
        nodes += tail
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    g.name = graph_name
    missing = set(activations) - graph_inputs - {n.output[0] for n in nodes if n.op_type in ("DequantizeLinear", "Cast")}
    if missing or graph_outputs - {o for n in nodes for o in n.output} - graph_inputs:
        raise RuntimeError(f"QDQ rewrite lost tensors: {sorted(missing)[:5]}")
    onnx.checker.check_model(model)
    for stale in (dst, dst.with_suffix(".data")):
        if stale.exists():
            os.unlink(stale)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.with_suffix(".data").name, size_threshold=1024)


def dequantize(p: QuantParam) -> np.ndarray:
    """The float values a DequantizeLinear of `p` yields (for the sim, and for checks)."""
    scale, zero = p.scale.astype(np.float32), p.zero_point.astype(np.float32)
    if p.block_size:
        scale, zero = (np.repeat(a, p.block_size, axis=1) for a in (scale, zero))
    elif p.axis == 0:
        shape = (-1,) + (1,) * (p.codes.ndim - 1)
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (p.codes.astype(np.float32) - zero) * scale
