"""The device form of a QDQ AR graph: what an HTP context binary (and Genie) must see.

The quantize stage's QDQ graph keeps float I/O so onnxruntime on the CPU can check it. On the
device the I/O is quantized — Genie copies raw uint8 KV bytes between steps and AR graphs, and
quantizes mask / RoPE inputs and dequantizes logits with the scale/offset it reads from the
binary — so here:

- a float graph input that only feeds a QuantizeLinear becomes that Q's integer type and the Q
  goes: the binary's input carries the Genie name (`attention_mask`, `past_key_0_in`, ...);
- a graph output produced by a DequantizeLinear becomes the Q's integer output under the same
  name (internal consumers keep reading the dequantized copy);
- an embedding table dequantized per row (its grid is the tied LM head's) feeding a Gather whose
  output is re-quantized per-tensor is stored on that output grid instead: quantizing after a
  Gather equals gathering quantized rows, so the numbers do not change, and HTP gets the
  DQ → Gather → Q unit it runs natively (it cannot gather a per-row-quantized table);
- each RMSNorm (x²-mean-rsqrt-gamma chain) becomes one SimplifiedLayerNormalization node, HTP's
  RmsNorm, as qairt-converter fuses it: op by op, HTP runs the chain in float16 and the BOS
  token's x² overflows (the simulator's logits were uncorrelated with the CPU's before this);
- a Conv/MatMul fed by a float16 mixed-precision activation gets its weight as the float
  constant its DequantizeLinear yields (HTP runs that op in float16 and has no standalone
  dequantize of a blocked int4 constant).

Without these, onnxruntime-qnn leaves those Q/DQ nodes on the CPU (or, with CPU fallback off,
refuses the graph), and the binary would take a float embedding table as an input.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.engine.errors import KilnError
from pipeline.qnn.quant.qdq import load_weights

INT_TYPES = {TensorProto.UINT8: "uint8", TensorProto.INT8: "int8", TensorProto.UINT16: "uint16",
             TensorProto.INT16: "int16", TensorProto.INT32: "int32", TensorProto.INT64: "int64",
             TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}


@dataclass(frozen=True)
class TensorIO:
    """One graph input or output as the device sees it; float = (q - zero_point) * scale."""

    name: str
    dtype: str
    shape: list[int]
    scale: float | None = None
    zero_point: int | None = None

    def to_json(self) -> dict:
        return asdict(self)


class _Graph:
    """The graph's nodes as a Python list with producer/consumer indexes kept current through
    every edit (a lookup was a scan of the node list: quadratic, ~17 s per graph at 135M), written
    back into the model once by `commit`."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.g = model.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self.nodes: list[onnx.NodeProto] = []
        for n in self.g.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            self.nodes.append(copy)
        del self.g.node[:]
        self._order = {id(n): float(i) for i, n in enumerate(self.nodes)}
        self._removed: set[int] = set()
        self._producer: dict[str, onnx.NodeProto] = {}
        self._consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            self._index(n)

    def _index(self, node: onnx.NodeProto) -> None:
        for o in node.output:
            self._producer[o] = node
        for i in dict.fromkeys(node.input):
            self._consumers.setdefault(i, []).append(node)

    def _unindex(self, node: onnx.NodeProto) -> None:
        for o in node.output:
            if self._producer.get(o) is node:
                del self._producer[o]
        for i in dict.fromkeys(node.input):
            users = self._consumers.get(i, [])
            users[:] = [u for u in users if u is not node]

    def live(self, op_type: str) -> list[onnx.NodeProto]:
        return [n for n in self.nodes if n.op_type == op_type and id(n) not in self._removed]

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        return sorted(self._consumers.get(name, []), key=lambda n: self._order[id(n)])

    def producer(self, name: str) -> onnx.NodeProto | None:
        return self._producer.get(name)

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def remove(self, node: onnx.NodeProto) -> None:
        self._unindex(node)
        self._removed.add(id(node))

    def insert_before(self, anchor: onnx.NodeProto, node: onnx.NodeProto) -> None:
        self._order[id(node)] = self._order[id(anchor)] - 0.5
        self.nodes.append(node)
        self._index(node)

    def set_io(self, node: onnx.NodeProto, inputs: list[str] | None = None, outputs: list[str] | None = None) -> None:
        self._unindex(node)
        if inputs is not None:
            node.input[:] = inputs
        if outputs is not None:
            node.output[:] = outputs
        self._index(node)

    def add_initializer(self, tensor: TensorProto) -> None:
        self.g.initializer.append(tensor)
        self.inits[tensor.name] = tensor

    def drop_unused_initializers(self) -> None:
        keep = [i for i in self.g.initializer if self._consumers.get(i.name)]
        del self.g.initializer[:]
        self.g.initializer.extend(keep)

    def rename_input(self, old: str, new: str) -> None:
        for n in list(self._consumers.get(old, [])):
            self.set_io(n, inputs=[new if i == old else i for i in n.input])

    def commit(self) -> None:
        """Write the live nodes back into the model, in graph order."""
        live = [n for n in self.nodes if id(n) not in self._removed]
        self.g.node.extend(sorted(live, key=lambda n: self._order[id(n)]))


def _quant_io(graph: _Graph, q: onnx.NodeProto) -> tuple[float, int, int]:
    scale = float(graph.array(q.input[1]))
    zp = graph.inits[q.input[2]]
    return scale, int(numpy_helper.to_array(zp)), zp.data_type


def _dequantized(graph: _Graph, dq: onnx.NodeProto) -> np.ndarray:
    """The float values a DequantizeLinear of an initializer yields: per-tensor, per-axis or blocked."""
    codes = graph.array(dq.input[0]).astype(np.float32)
    scale = graph.array(dq.input[1]).astype(np.float32)
    zero = graph.array(dq.input[2]).astype(np.float32) if len(dq.input) > 2 else np.zeros_like(scale)
    attrs = {a.name: a.i for a in dq.attribute}
    axis = attrs.get("axis", 1) % codes.ndim
    if attrs.get("block_size"):
        scale, zero = (np.repeat(a, attrs["block_size"], axis=axis) for a in (scale, zero))
    elif scale.ndim == 1 and scale.size > 1:
        shape = [1] * codes.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (codes - zero) * scale


def _fold_embedding(graph: _Graph) -> int:
    """Store per-row-quantized tables that feed a Gather on the Gather output's grid."""
    folded = 0
    for gather in graph.live("Gather"):
        dq = graph.producer(gather.input[0])
        after = graph.consumers(gather.output[0])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in graph.inits:
            continue
        if len(after) != 1 or after[0].op_type != "QuantizeLinear" or len(graph.consumers(dq.output[0])) != 1:
            continue
        q = after[0]
        scale, zero, dtype = _quant_io(graph, q)
        info = np.iinfo(helper.tensor_dtype_to_np_dtype(dtype))
        codes = np.clip(np.rint(_dequantized(graph, dq) / scale) + zero, info.min, info.max).astype(info.dtype)
        name = f"{dq.input[0]}_on_{q.name}"
        graph.add_initializer(numpy_helper.from_array(codes, name))
        graph.set_io(dq, inputs=[name, q.input[1], q.input[2]])
        del dq.attribute[:]
        folded += 1
    return folded


DATA_MOVEMENT = {"Unsqueeze", "Squeeze", "Reshape", "Transpose", "Flatten"}
WEIGHTED = {"Conv", "MatMul", "Gemm"}


def _float_weights_for_float_ops(graph: _Graph) -> int:
    """A weighted op whose activation is float (a float16 mixed-precision tensor, not a DQ output)
    runs in float16 on HTP, which cannot dequantize a constant for it (no standalone blocked DQ):
    give it the dequantized weight as a float constant — the same values."""
    folded = 0
    for node in [n for op in sorted(WEIGHTED) for n in graph.live(op)]:
        source = graph.producer(node.input[0])
        while source is not None and source.op_type in DATA_MOVEMENT:
            source = graph.producer(source.input[0])
        dq = graph.producer(node.input[1])
        if source is None or source.op_type == "DequantizeLinear" or dq is None or dq.op_type != "DequantizeLinear" \
                or dq.input[0] not in graph.inits or len(graph.consumers(dq.output[0])) != 1:
            continue
        graph.add_initializer(numpy_helper.from_array(_dequantized(graph, dq), dq.output[0]))
        graph.remove(dq)
        folded += 1
    return folded


def _value_shape(v: onnx.ValueInfoProto) -> list[int]:
    return [d.dim_value for d in v.type.tensor_type.shape.dim]


def _single_consumer(graph: _Graph, tensor: str, op: str) -> onnx.NodeProto | None:
    users = graph.consumers(tensor)
    return users[0] if len(users) == 1 and users[0].op_type == op else None


def _constant(graph: _Graph, tensor: str) -> float | None:
    node = graph.producer(tensor)
    if node is not None and node.op_type == "Constant":
        return float(numpy_helper.to_array(node.attribute[0].t))
    return float(graph.array(tensor)) if tensor in graph.inits else None


def _other(node: onnx.NodeProto, tensor: str) -> str:
    return next(i for i in node.input if i != tensor)


def _fuse_rmsnorm(graph: _Graph) -> int:
    """x * 1/sqrt(mean(x²) + eps) * gamma as ONE SimplifiedLayerNormalization node (HTP's RmsNorm,
    quantized in and out, as qairt-converter fuses it): op by op, HTP would run the chain in
    float16, where x² of the BOS token's residual overflows."""
    fused = 0
    for pow_node in [n for n in graph.live("Pow") if _constant(graph, n.input[1]) == 2.0]:
        x = pow_node.input[0]
        mean = _single_consumer(graph, pow_node.output[0], "ReduceMean")
        add = mean and _single_consumer(graph, mean.output[0], "Add")
        sqrt = add and _single_consumer(graph, add.output[0], "Sqrt")
        div = sqrt and _single_consumer(graph, sqrt.output[0], "Div")
        scale = div and _single_consumer(graph, div.output[0], "Mul")
        gamma_mul = scale and _single_consumer(graph, scale.output[0], "Mul")
        if not gamma_mul or _other(scale, div.output[0]) != x or _constant(graph, div.input[0]) != 1.0:
            continue
        source = graph.producer(x)
        if source is None or source.op_type != "DequantizeLinear":
            continue  # a float16 input: HTP's float RmsNorm does not finalize at AR-128 (MEM_ALLOC)
        eps = _constant(graph, _other(add, mean.output[0]))
        if eps is None:
            continue
        gamma = _other(gamma_mul, scale.output[0])
        chain = [pow_node, mean, add, sqrt, div, scale, gamma_mul]
        for n in chain:
            graph.remove(n)
        graph.insert_before(pow_node, helper.make_node(
            "SimplifiedLayerNormalization", [x, gamma], [gamma_mul.output[0]], name=f"{gamma_mul.name}_RmsNorm",
            axis=-1, epsilon=eps, stash_type=1))
        fused += 1
    constants = [n for n in graph.live("Constant") if not graph.consumers(n.output[0])]
    for n in constants:
        graph.remove(n)
    return fused


def device_io(model: onnx.ModelProto) -> tuple[list[TensorIO], list[TensorIO]]:
    """Rewrite `model` in place to quantized I/O; return its inputs and outputs as the device sees them."""
    graph = _Graph(model)
    _fold_embedding(graph)
    _float_weights_for_float_ops(graph)
    _fuse_rmsnorm(graph)
    graph.drop_unused_initializers()
    inputs: list[TensorIO] = []
    for v in graph.g.input:
        users = graph.consumers(v.name)
        elem = v.type.tensor_type.elem_type
        if elem == TensorProto.FLOAT and users and all(u.op_type == "QuantizeLinear" for u in users):
            q = users[0]
            scale, zero, dtype = _quant_io(graph, q)
            for other in users:
                if _quant_io(graph, other) != (scale, zero, dtype):
                    raise ValueError(f"graph input {v.name} is quantized with two different encodings")
                graph.rename_input(other.output[0], v.name)
                graph.remove(other)
            v.type.tensor_type.elem_type = dtype
            inputs.append(TensorIO(v.name, INT_TYPES[dtype], _value_shape(v), scale, zero))
        else:
            inputs.append(TensorIO(v.name, INT_TYPES[elem], _value_shape(v)))
    outputs: list[TensorIO] = []
    for v in graph.g.output:
        dq = graph.producer(v.name)
        if dq is None or dq.op_type != "DequantizeLinear":
            outputs.append(TensorIO(v.name, INT_TYPES[v.type.tensor_type.elem_type], _value_shape(v)))
            continue
        q = graph.producer(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            raise ValueError(f"graph output {v.name}: its DequantizeLinear does not follow a QuantizeLinear")
        scale, zero, dtype = _quant_io(graph, q)
        inner = f"{v.name}_dq"
        quantized = dq.input[0]
        graph.rename_input(v.name, inner)   # internal consumers read the dequantized copy
        graph.set_io(dq, outputs=[inner])
        graph.set_io(q, outputs=[v.name])
        graph.rename_input(quantized, v.name)
        if not graph.consumers(inner):
            graph.remove(dq)
        v.type.tensor_type.elem_type = dtype
        outputs.append(TensorIO(v.name, INT_TYPES[dtype], _value_shape(v), scale, zero))
    graph.commit()
    return inputs, outputs


Part = tuple[onnx.ModelProto, list[TensorIO], list[TensorIO]]


def part_ranges(layers: int, parts: int) -> list[range]:
    """Decoder layers of each part, as even as they go (the first parts take the remainder)."""
    if not 1 <= parts <= layers:
        raise KilnError(f"num_splits: cannot split {layers} decoder layers into {parts} parts")
    size, extra = divmod(layers, parts)
    starts = [i * size + min(i, extra) for i in range(parts + 1)]
    return [range(a, b) for a, b in zip(starts, starts[1:])]


def _boundary(graph: _Graph, layer: int) -> onnx.NodeProto:
    """The QuantizeLinear of the residual stream entering decoder layer `layer` (the output of
    layer-1's last residual Add): its quantized output is what the parts hand each other."""
    scope, before = f"/blocks.{layer}/", f"/blocks.{layer - 1}/"
    found = {}
    for node in graph.nodes:
        if id(node) in graph._removed or not node.name.startswith(scope):
            continue
        for tensor in node.input:
            dq = graph.producer(tensor)
            q = dq and dq.op_type == "DequantizeLinear" and graph.producer(dq.input[0])
            if q and q.op_type == "QuantizeLinear" and (src := graph.producer(q.input[0])) is not None \
                    and src.name.startswith(before):
                found[q.output[0]] = q
    if len(found) != 1:
        raise ValueError(f"no single quantized residual tensor enters decoder layer {layer} (found {sorted(found)})")
    return next(iter(found.values()))


def _extract(graph: _Graph, model: onnx.ModelProto, name: str, inputs: list[str], outputs: list[str],
             value_info: dict[str, onnx.ValueInfoProto]) -> onnx.ModelProto:
    """The nodes computing `outputs` from `inputs` (and initializers) as a model of their own."""
    stop, wanted, keep = set(inputs), list(outputs), set()
    while wanted:
        node = graph.producer(wanted.pop())
        if node is None or id(node) in keep:
            continue
        keep.add(id(node))
        wanted += [t for t in node.input if t and t not in stop and t not in graph.inits]
    nodes = [n for n in graph.nodes if id(n) in keep and id(n) not in graph._removed]
    nodes.sort(key=lambda n: graph._order[id(n)])
    used = {t for n in nodes for t in n.input}
    made = {t for n in nodes for t in n.output} | set(inputs) | set(graph.inits) | {""}
    if stray := sorted(used - made):
        raise KilnError(f"{name}: the part reads {', '.join(stray[:5])}, which neither it nor its inputs provide")
    part = helper.make_model(
        helper.make_graph(nodes, name, [value_info[t] for t in inputs], [value_info[t] for t in outputs],
                          [graph.inits[t] for t in graph.inits if t in used]),
        opset_imports=model.opset_import, ir_version=model.ir_version)
    return part


def split_device_graph(model: onnx.ModelProto, inputs: list[TensorIO], outputs: list[TensorIO], layers: int,
                       parts: int) -> Iterator[Part]:
    """Cut a device-form AR graph into `parts` graphs of consecutive decoder layers (the first with
    the embedding, the last with the final norm and LM head). A part hands the next its layers'
    residual stream as the quantized tensor (uint16 and its encoding): Genie passes it on by name,
    raw, as it passes KV bytes."""
    if parts == 1:
        yield model, inputs, outputs
        return
    shapes = onnx.shape_inference.infer_shapes(_skeleton(model))
    graph = _Graph(model)  # takes the nodes out of `model`: the parts are new models
    value_info = {v.name: v for v in [*shapes.graph.value_info, *shapes.graph.input, *shapes.graph.output]}
    io = {t.name: t for t in [*inputs, *outputs]}
    ranges = part_ranges(layers, parts)
    cuts: list[TensorIO] = []
    for r in ranges[1:]:
        q = _boundary(graph, r.start)
        scale, zero, dtype = _quant_io(graph, q)
        v = value_info[q.output[0]]
        cut = TensorIO(q.output[0], INT_TYPES[dtype], _value_shape(v), scale, zero)
        io[cut.name] = cut
        cuts.append(cut)

    def own(names: list[str], r: range) -> list[str]:
        return [n for n in names if not n.startswith("past_") or int(n.split("_")[2]) in r]

    base = [t.name for t in inputs]
    for i, r in enumerate(ranges):  # one part at a time: each holds copies of its weights
        part_in = ([cuts[i - 1].name] if i else []) + [n for n in own(base, r) if n != "input_ids" or i == 0]
        part_out = ([o.name for o in outputs if o.name == "logits"] if i == len(ranges) - 1 else [cuts[i].name]) \
            + [o.name for o in outputs if o.name.startswith("past_") and int(o.name.split("_")[2]) in r]
        part = _extract(graph, model, f"{model.graph.name}_{i + 1}_of_{parts}", part_in, part_out, value_info)
        needed = {t for n in part.graph.node for t in n.input}
        part_in = [n for n in part_in if n in needed]  # e.g. RoPE tables a part without attention skips
        del part.graph.input[:]
        part.graph.input.extend(value_info[n] for n in part_in)
        yield part, [io[n] for n in part_in], [io[n] for n in part_out]


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` without its weights (names, types and dims kept), built without copying them: for
    shape inference of a graph whose weights are in memory (at 1B, gigabytes)."""
    stubs = []
    for t in model.graph.initializer:
        stub = TensorProto(name=t.name, data_type=t.data_type, dims=t.dims, data_location=TensorProto.EXTERNAL)
        stub.external_data.add(key="location", value="skeleton")
        stubs.append(stub)
    graph = helper.make_graph(model.graph.node, model.graph.name, model.graph.input, model.graph.output, stubs,
                              value_info=model.graph.value_info)
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def save_graph(model: onnx.ModelProto, dst: Path) -> None:
    """`model` at `dst` with its weights in `<dst stem>.data`."""
    # no onnx.checker: SimplifiedLayerNormalization is onnxruntime's (default domain), not ONNX's
    for stale in (dst, dst.with_suffix(".data")):
        if stale.exists():
            os.unlink(stale)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.with_suffix(".data").name, size_threshold=1024)


def write_device_graphs(src: Path, dst_dir: Path, parts: int) -> list[tuple[str, list[TensorIO], list[TensorIO]]]:
    """The device form of QDQ graph `src` (see the module doc), in `parts` parts, each saved in
    `dst_dir` as `<graph name>.onnx` (+ `.data`; with parts, `<graph>_<i>_of_<n>`); returns each
    part's (graph name, inputs, outputs)."""
    model = onnx.load(str(src), load_external_data=False)
    load_weights(model, src.parent)
    inputs, outputs = device_io(model)
    layers = sum(t.name.startswith("past_key_") for t in inputs)
    written = []
    for part, ins, outs in split_device_graph(model, inputs, outputs, layers, parts):
        save_graph(part, dst_dir / f"{part.graph.name}.onnx")
        written.append((part.graph.name, ins, outs))
    return written
