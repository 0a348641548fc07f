"""ONNX files with external data, rewritten one tensor at a time: a 1B model's float graph is
~6 GB, and loading it whole (then serializing a copy) doubled the export's peak memory."""
from __future__ import annotations

import sys
from pathlib import Path

import onnx
from onnx.external_data_helper import (
    load_external_data_for_tensor,
    save_external_data,
    set_external_data,
    uses_external_data,
)

SIZE_THRESHOLD = 1024  # tensors at least this large go to the data file (onnx.save_model's rule)


def _node_tensors(graph: onnx.GraphProto):
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _node_tensors(attr.g)
            for sub in attr.graphs:
                yield from _node_tensors(sub)


def gather_external_data(src: Path, dst: Path, graph_name: str) -> None:
    """`src` (whose weights may lie in many files beside it, as torch writes them) → `dst` with every
    initializer of at least SIZE_THRESHOLD bytes in one `<dst stem>.data`, in initializer order: the
    bytes `onnx.save_model(..., all_tensors_to_one_file=True, size_threshold=1024)` would write,
    holding one tensor in memory at a time."""
    model = onnx.load(str(src), load_external_data=False)
    model.graph.name = graph_name
    base, data_name = str(src.parent), dst.with_suffix(".data").name
    for stale in (dst, dst.with_suffix(".data")):
        stale.unlink(missing_ok=True)
    dst.with_suffix(".data").touch()
    for tensor in _node_tensors(model.graph):  # attribute tensors stay inline, as onnx.save_model keeps them
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, base)
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, base)
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
        if tensor.HasField("raw_data") and sys.getsizeof(tensor.raw_data) >= SIZE_THRESHOLD:
            set_external_data(tensor, data_name)
            save_external_data(tensor, str(dst.parent))
            tensor.ClearField("raw_data")
    with open(dst, "wb") as f:
        f.write(model.SerializeToString())
