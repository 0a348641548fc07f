"""pipeline.qnn.qnn_binary against context binaries compiled here by onnxruntime-qnn from a tiny QDQ model."""
from __future__ import annotations

import ctypes
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipeline.engine.errors import ToolMissing
from pipeline.qnn import qnn_binary
from pipeline.qnn.qnn_binary import QnnBinaryError, check_binary, read_binary_info

onnxruntime_qnn = pytest.importorskip("onnxruntime_qnn")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

EP = "QNNExecutionProvider"
X_SCALE, Y_SCALE, ZERO_U16 = 1 / 32768, 1 / 1024, 32768


def _tiny_qdq_model(path: Path) -> None:
    """x[1,4] -> Q/DQ uint16 -> MatMul with DQ'd int8 symmetric weights -> Q/DQ uint16 -> y[1,4]."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, value: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(value, name)

    inits = [
        const("x_s", np.array(X_SCALE, np.float32)), const("x_z", np.array(ZERO_U16, np.uint16)),
        const("w_q", (np.arange(16, dtype=np.int8) - 8).reshape(4, 4)),
        const("w_s", np.array(0.01, np.float32)), const("w_z", np.array(0, np.int8)),
        const("y_s", np.array(Y_SCALE, np.float32)), const("y_z", np.array(ZERO_U16, np.uint16)),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_z"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w_dq"]),
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["y_f"]),
        helper.make_node("QuantizeLinear", ["y_f", "y_s", "y_z"], ["y_q"]),
        helper.make_node("DequantizeLinear", ["y_q", "y_s", "y_z"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, path)


def _register_qnn_ep() -> None:
    # Registering the same EP library twice in one process raises, and other tests may have done it.
    if any(d.ep_name == EP for d in ort.get_ep_devices()):
        return
    ort.register_execution_provider_library(EP, onnxruntime_qnn.get_library_path())


@pytest.fixture(scope="module")
def compile_tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Path, Path]]:
    """compile(htp_arch, soc_model, **options) -> (context binary, EPContext ONNX)."""
    _register_qnn_ep()
    src = tmp_path_factory.mktemp("qdq") / "m.onnx"
    _tiny_qdq_model(src)

    def compile_(htp_arch: str, soc_model: str, **options: str) -> tuple[Path, Path]:
        out = tmp_path_factory.mktemp(f"ctx_v{htp_arch}_soc{soc_model}")
        devices = [d for d in ort.get_ep_devices() if d.ep_name == EP]
        so = ort.SessionOptions()
        so.add_provider_for_devices(devices, {"backend_type": "htp", "htp_arch": htp_arch, "soc_model": soc_model,
                                              **options})
        so.add_session_config_entry("ep.context_enable", "1")
        so.add_session_config_entry("ep.context_file_path", str(out / "m_ctx.onnx"))
        so.add_session_config_entry("ep.context_embed_mode", "0")
        ort.InferenceSession(str(src), so)
        (binary,) = out.glob("*.bin")
        return binary, out / "m_ctx.onnx"

    return compile_


def _ep_context_graph_name(ctx_onnx: Path) -> str:
    (node,) = [n for n in onnx.load(ctx_onnx).graph.node if n.op_type == "EPContext"]
    attrs = {a.name: a for a in node.attribute}
    return attrs["partition_name"].s.decode()


def test_reads_sm8750_binary(compile_tiny: Callable[..., tuple[Path, Path]]) -> None:
    binary, ctx = compile_tiny("79", "69")
    info = read_binary_info(binary)
    json.dumps(info)  # JSON-serialisable as promised
    assert info["backend"] == "HTP" and info["backend_id"] == 6
    assert info["soc_model"] == 69 and info["htp_arch"] == 79
    assert info["build_id"].startswith("v2.") and info["core_api_version"].startswith("2.")
    (graph,) = info["graphs"]
    assert graph["name"] == _ep_context_graph_name(ctx)
    (x,), (y,) = graph["inputs"], graph["outputs"]
    # The binary names the float-side tensors (EPContext's io_name_overrides), not x_q / y_q.
    assert (x["name"], x["dtype"], x["dims"], x["encoding"]) == ("x", "UFIXED_POINT_16", [1, 4], "SCALE_OFFSET")
    assert (y["name"], y["dtype"], y["dims"], y["encoding"]) == ("y", "UFIXED_POINT_16", [1, 4], "SCALE_OFFSET")
    # QNN's offset is minus the ONNX zero point: float = (q + offset) * scale.
    assert x["scale"] == pytest.approx(X_SCALE) and x["offset"] == -ZERO_U16
    assert y["scale"] == pytest.approx(Y_SCALE) and y["offset"] == -ZERO_U16
    assert check_binary(info, 69, {graph["name"]: {"inputs": ["x"], "outputs": ["y"]}}) == []


def test_reads_other_soc_and_vtcm(compile_tiny: Callable[..., tuple[Path, Path]]) -> None:
    binary, _ = compile_tiny("75", "57", vtcm_mb="2")
    info = read_binary_info(binary)
    assert info["soc_model"] == 57 and info["htp_arch"] == 75
    assert info["vtcm_mb"] == 2 and info["graphs"][0]["vtcm_mb"] == 2


def test_check_binary_reports_problems(compile_tiny: Callable[..., tuple[Path, Path]]) -> None:
    binary, _ = compile_tiny("75", "57")
    info = read_binary_info(binary)
    name = info["graphs"][0]["name"]
    assert check_binary(info, 69, {name: {}}) == ["built for SoC model 57, the recipe wants 69"]
    problems = check_binary(info, 57, {name: {"inputs": ["x", "attention_mask"], "outputs": []}, "ar128": {}})
    assert problems == [
        f"graph {name!r}: inputs missing: attention_mask",
        f"graph {name!r}: unexpected outputs: y",
        f"graph 'ar128' is missing (the binary has {name})",
    ]
    assert check_binary({"graphs": []}, 69, {}) == ["the binary does not record its SoC model; the recipe wants 69"]


@pytest.mark.parametrize("content", [b"", b"hello, not a context binary\n", bytes(range(256)) * 64])
def test_not_a_binary(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.bin"
    path.write_bytes(content)
    with pytest.raises(QnnBinaryError, match="not a QNN context binary") as e:
        read_binary_info(path)
    assert str(path) in str(e.value)


def test_truncated_binary(compile_tiny: Callable[..., tuple[Path, Path]], tmp_path: Path) -> None:
    binary, _ = compile_tiny("79", "69")
    cut = tmp_path / "cut.bin"
    cut.write_bytes(binary.read_bytes()[: binary.stat().st_size // 2])
    with pytest.raises(QnnBinaryError, match="not a QNN context binary"):
        read_binary_info(cut)


def test_unknown_struct_versions_are_refused() -> None:
    info = qnn_binary.BinaryInfo(version=4)
    with pytest.raises(QnnBinaryError, match=r"x\.bin: QnnSystemContext_BinaryInfo_t version 4 "):
        qnn_binary._binary_info(info, Path("x.bin"))
    graph = qnn_binary.GraphInfo(version=7)
    with pytest.raises(QnnBinaryError, match="GraphInfo_t version 7"):
        qnn_binary._graph(graph, Path("x.bin"), htp=True)
    tensor = qnn_binary.Tensor(version=3)
    with pytest.raises(QnnBinaryError, match="Qnn_Tensor_t version 3"):
        qnn_binary._tensor(tensor, Path("x.bin"))


def test_struct_sizes_match_the_headers() -> None:
    # 64-bit sizes worked out by hand from the QNN 2.43 headers; a slip in a union shows up here.
    sizes = {qnn_binary.QuantizeParams: 40, qnn_binary.Tensor: 144, qnn_binary.GraphInfo: 88,
             qnn_binary.BinaryInfoV1: 128, qnn_binary.BinaryInfoV3: 136, qnn_binary.HtpGraphBlobInfo: 40}
    assert {t.__name__: ctypes.sizeof(t) for t in sizes} == {t.__name__: n for t, n in sizes.items()}


def test_missing_onnxruntime_qnn_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)  # makes the import fail
    with pytest.raises(ToolMissing, match="pip install onnxruntime-qnn"):
        qnn_binary._library_path()
