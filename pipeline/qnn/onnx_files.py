"""ONNX files with external data, rewritten without holding the weights: a 1B model's float graph
is ~6 GB. Loading it whole and saving a copy doubled the export's peak memory, and even tensor by
tensor, bytes set on a protobuf message stay in its arena until the whole model is freed; so the
weights are copied file to file here and the model proto only ever holds their locations."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_tensor, uses_external_data

SIZE_THRESHOLD = 1024  # onnx.save_model's rule: sys.getsizeof(raw_data) >= this goes to the data file
_BYTES_OVERHEAD = sys.getsizeof(b"")


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


def _point_at(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """What onnx's save_external_data records: location, offset, length (in that order)."""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def gather_external_data(src: Path, dst: Path, graph_name: str) -> None:
    """`src` (whose weights may lie in many files beside it, as torch writes them) → `dst` with every
    initializer of at least SIZE_THRESHOLD bytes in one `<dst stem>.data`, in initializer order: the
    bytes `onnx.save_model(..., all_tensors_to_one_file=True, size_threshold=1024)` would write."""
    model = onnx.load(str(src), load_external_data=False)
    model.graph.name = graph_name
    base, data = src.parent, dst.with_suffix(".data")
    for stale in (dst, data):
        stale.unlink(missing_ok=True)
    for tensor in _node_tensors(model.graph):  # attribute tensors stay inline, as onnx.save_model keeps them
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, str(base))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    with open(data, "wb") as out:
        for tensor in model.graph.initializer:
            if uses_external_data(tensor):
                info = ExternalDataInfo(tensor)
                if Path(info.location).name != info.location:
                    raise ValueError(f"{src}: initializer {tensor.name}: external data {info.location!r} is not beside it")
                with open(base / info.location, "rb") as f:
                    f.seek(info.offset or 0)
                    size = info.length if info.length else (base / info.location).stat().st_size - (info.offset or 0)
                    if size + _BYTES_OVERHEAD < SIZE_THRESHOLD:  # small: inline, as onnx would keep it
                        tensor.raw_data = f.read(size)
                        tensor.data_location = onnx.TensorProto.DEFAULT
                        del tensor.external_data[:]
                        continue
                    offset = out.tell()
                    shutil.copyfileobj(_Limited(f, size), out, 16 << 20)
                    if out.tell() - offset != size:
                        raise ValueError(f"{src}: initializer {tensor.name}: {info.location} ends before its {size} bytes")
            elif tensor.HasField("raw_data") and sys.getsizeof(tensor.raw_data) >= SIZE_THRESHOLD:
                offset, size = out.tell(), len(tensor.raw_data)
                out.write(tensor.raw_data)
            else:
                continue
            _point_at(tensor, data.name, offset, size)
    with open(dst, "wb") as f:
        f.write(model.SerializeToString())


class _Limited:
    """A file object that reads at most `size` bytes of `f`."""

    def __init__(self, f, size: int) -> None:
        self.f, self.left = f, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        chunk = self.f.read(n)
        self.left -= len(chunk)
        return chunk
