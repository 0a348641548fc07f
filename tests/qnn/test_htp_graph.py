"""The device form of a QDQ graph (pipeline/qnn/htp_graph.py) computes exactly what the float-I/O QDQ
graph does, with quantized I/O, the embedding table on its Gather grid and float weights for
float16 (mixed-precision) ops; and onnxruntime-qnn then compiles it whole, with no CPU fallback."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.qnn.htp_graph import TensorIO, write_device_graphs

V, H, OUT, BLOCK = 16, 8, 4, 4


def _qdq(name: str, src: str, dst: str, scale: float, zero: int, dtype: int = TensorProto.UINT16):
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    inits = [numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
             numpy_helper.from_array(np.array(zero, np_type), f"{name}_z")]
    nodes = [helper.make_node("QuantizeLinear", [src, f"{name}_s", f"{name}_z"], [f"{name}_q"], name=f"{name}_Q"),
             helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [dst], name=f"{name}_DQ")]
    return nodes, inits


def toy_qdq(path) -> None:
    """ids → embedding (int8 per-row, Gather, 16-bit) → + bias input (16-bit) → float16 island →
    Conv with blocked int4 weights → 16-bit output; plus an 8-bit KV-like input passed to an output."""
    rng = np.random.default_rng(0)
    table = rng.integers(-127, 128, (V, H)).astype(np.int8)
    row_scale = rng.uniform(0.001, 0.01, V).astype(np.float32)
    w = rng.integers(-8, 8, (OUT, H, 1, 1)).astype(np.int8)
    w_scale = rng.uniform(0.01, 0.05, (OUT, H // BLOCK, 1, 1)).astype(np.float32)
    nodes, inits = [], [
        numpy_helper.from_array(table, "embed_w"), numpy_helper.from_array(row_scale, "embed_s"),
        numpy_helper.from_array(np.zeros(V, np.int8), "embed_z"),
        helper.make_tensor("conv_w", TensorProto.INT4, w.shape, w.ravel().tolist()),
        numpy_helper.from_array(w_scale, "conv_s"),
        helper.make_tensor("conv_z", TensorProto.INT4, w_scale.shape, [0] * w_scale.size),
    ]
    nodes += [helper.make_node("DequantizeLinear", ["embed_w", "embed_s", "embed_z"], ["embed"], axis=0),
              helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64),
              helper.make_node("Gather", ["embed", "ids64"], ["emb_f"])]
    for name, src, dst, scale, zero in [("emb", "emb_f", "emb", 0.02 / 65535 * 16, 32768),
                                        ("bias", "bias", "bias_dq", 1e-4, 30000), ("sum", "sum_f", "sum", 2e-4, 32000)]:
        if name == "sum":
            nodes.append(helper.make_node("Add", ["emb", "bias_dq"], ["sum_f"]))
        n, i = _qdq(name, src, dst, scale, zero)
        nodes += n
        inits += i
    nodes += [helper.make_node("Cast", ["sum"], ["sum16"], to=TensorProto.FLOAT16),
              helper.make_node("Cast", ["sum16"], ["sum32"], to=TensorProto.FLOAT),
              helper.make_node("Transpose", ["sum32"], ["x_t"], perm=[0, 2, 1]),
              helper.make_node("Unsqueeze", ["x_t", "axes"], ["x4"]),
              helper.make_node("DequantizeLinear", ["conv_w", "conv_s", "conv_z"], ["conv_wf"], axis=1,
                               block_size=BLOCK),
              helper.make_node("Conv", ["x4", "conv_wf"], ["y_f"])]
    inits.append(numpy_helper.from_array(np.array([3], np.int64), "axes"))
    n, i = _qdq("y", "y_f", "y", 0.05, 32768)
    nodes += n
    inits += i
    n, i = _qdq("kv", "kv_in", "kv_dq", 0.03, 128, TensorProto.UINT8)
    nodes += n + [helper.make_node("Identity", ["kv_dq"], ["kv_f"])]
    inits += i
    n, i = _qdq("kvo", "kv_f", "kv_out", 0.03, 128, TensorProto.UINT8)
    nodes += n
    inits += i
    graph = helper.make_graph(
        nodes, "toy",
        [helper.make_tensor_value_info("ids", TensorProto.INT32, [1, 3]),
         helper.make_tensor_value_info("bias", TensorProto.FLOAT, [1, 3, H]),
         helper.make_tensor_value_info("kv_in", TensorProto.FLOAT, [1, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, OUT, 3, 1]),
         helper.make_tensor_value_info("kv_out", TensorProto.FLOAT, [1, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def quantized(t: TensorIO, values: np.ndarray) -> np.ndarray:
    info = np.iinfo(t.dtype)
    return np.clip(np.rint(values / t.scale) + t.zero_point, info.min, info.max).astype(t.dtype)


def test_device_graph_is_exact_with_quantized_io(tmp_path):
    toy_qdq(tmp_path / "toy.onnx")
    (tmp_path / "device").mkdir()
    [(name, ins, outs)] = write_device_graphs(tmp_path / "toy.onnx", tmp_path / "device", parts=1)
    assert name == "toy"
    dev = tmp_path / "device" / "toy.onnx"
    kinds = {t.name: t.dtype for t in ins + outs}
    assert kinds == {"ids": "int32", "bias": "uint16", "kv_in": "uint8", "y": "uint16", "kv_out": "uint8"}
    device = onnx.load(str(dev))
    # the input Qs are gone (the device feeds codes); the output Qs now write the graph outputs
    assert sorted(n.name for n in device.graph.node if n.op_type == "QuantizeLinear") == ["emb_Q", "kvo_Q", "sum_Q", "y_Q"]
    assert not [n for n in device.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in ("y", "kv_out")]
    gather_table = next(n for n in device.graph.node if n.output[0] == "embed").input[0]
    assert numpy_helper.to_array(next(i for i in device.graph.initializer if i.name == gather_table)).dtype == np.uint16
    assert "conv_wf" in {i.name for i in device.graph.initializer}  # float16 island: float weights

    rng = np.random.default_rng(1)
    floats = {"ids": rng.integers(0, V, (1, 3)).astype(np.int32),
              "bias": rng.normal(0, 0.5, (1, 3, H)).astype(np.float32),
              "kv_in": rng.normal(0, 1, (1, 5)).astype(np.float32)}
    feed = {t.name: floats[t.name] if t.scale is None else quantized(t, floats[t.name]) for t in ins}
    for t in ins:  # the QDQ graph sees exactly the values the device I/O can carry
        if t.scale is not None:
            floats[t.name] = ((feed[t.name].astype(np.float32) - t.zero_point) * t.scale).astype(np.float32)
    reference = ort.InferenceSession(str(tmp_path / "toy.onnx")).run(None, floats)
    device_out = ort.InferenceSession(str(dev)).run(None, feed)
    for t, ref, got in zip(outs, reference, device_out):
        assert np.array_equal(quantized(t, ref), got), t.name


def test_onnxruntime_qnn_compiles_the_device_graph_whole(tmp_path):
    pytest.importorskip("onnxruntime_qnn")
    from pipeline.qnn.ort_qnn import compile_graph

    toy_qdq(tmp_path / "toy.onnx")
    (tmp_path / "device").mkdir()
    [(name, _, _)] = write_device_graphs(tmp_path / "toy.onnx", tmp_path / "device", parts=1)
    compile_graph(tmp_path / "device" / f"{name}.onnx", tmp_path / "ctx.onnx", 69, 79, {})  # CPU fallback off: fails if split
    assert [n.op_type for n in onnx.load(str(tmp_path / "ctx.onnx")).graph.node] == ["EPContext"]


def test_renamed_part_graphs_keep_ar_and_part_whatever_the_model_name(tmp_path):
    """A long model name is shortened, never the `_ar<N>_cl<N>_<i>_of_<n>` tail that tells the AR-128
    and AR-1 graphs of one part apart (they share a binary); the binary must name the old graph once."""
    import onnx
    from onnx import helper

    from pipeline.engine.errors import KilnError
    from pipeline.qnn.ort_qnn import rename_compiled_graph

    old = "QNNExecutionProvider_QNNExecutionProvider_4101098293989717594_1_0"
    names = {}
    for ar in (128, 1):
        graph = f"Llama-3.2-1B-Instruct-synthetic-rehearsal_ar{ar}_cl4096_1_of_2"
        hashed = old if ar == 128 else old.replace("_1_0", "_2_0")  # two graphs of one shared binary
        node = helper.make_node("EPContext", [], ["y"], name=hashed, ep_cache_context="shared.bin",
                                partition_name=hashed, domain="com.microsoft")
        ctx = tmp_path / f"{graph}.onnx"
        onnx.save(helper.make_model(helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", 1, [1])])), ctx)
        names[ar] = (ctx, graph, node.name)
    (tmp_path / "shared.bin").write_bytes(b"\x41\x00\x00\x00" + names[128][2].encode() + b"\x00" * 8 + names[1][2].encode())
    new = {ar: rename_compiled_graph(ctx, graph) for ar, (ctx, graph, _) in names.items()}
    assert new[128] != new[1] and new[128].endswith("_ar128_cl4096_1_of_2") and new[1].endswith("_ar1_cl4096_1_of_2")
    assert all(len(n) == len(old) for n in new.values())
    data = (tmp_path / "shared.bin").read_bytes()
    assert data.count(new[128].encode()) == 1 and data.count(new[1].encode()) == 1 and b"QNNExecution" not in data
    assert onnx.load(str(names[1][0])).graph.node[0].name == new[1]
    with pytest.raises(KilnError, match="not in the context binary"):  # renamed already: the old name is gone
        rename_compiled_graph(names[1][0], names[1][1])


@pytest.mark.slow
def test_two_parts_chained_compute_exactly_the_whole_device_graph(tiny_htp_project):
    """The cut itself, without a compile (tests/qnn/test_verify_htp.py runs the parts on the
    simulator and in Genie, slowly): part 1's quantized residual fed to part 2 gives bit for bit
    the whole graph's logits and KV, and each part holds only its own layers' KV."""
    import json

    from tests.conftest import tiny_htp_recipe

    tiny_htp_project.write("ts.yaml", tiny_htp_recipe(scheme="w4a16_kv8"))
    tiny_htp_project.doit("recipe=ts", "ts:qnn.quantize")
    quantized_dir = tiny_htp_project.artifacts / "ts" / "qnn.quantize"
    graph = next(g for g in json.loads((quantized_dir / "quantize.json").read_text())["graphs"] if g["ar"] == 16)
    whole_dir, parts_dir = tiny_htp_project.dir / "whole", tiny_htp_project.dir / "parts"
    whole_dir.mkdir(), parts_dir.mkdir()
    [(name, ins, outs)] = write_device_graphs(quantized_dir / graph["qdq"], whole_dir, parts=1)
    parts = write_device_graphs(quantized_dir / graph["qdq"], parts_dir, parts=2)
    assert [p[0] for p in parts] == [f"{name}_1_of_2", f"{name}_2_of_2"]

    rng = np.random.default_rng(0)
    feed = {t.name: rng.integers(0, 40 if t.name == "input_ids" else np.iinfo(t.dtype).max, t.shape).astype(t.dtype)
            for t in ins}
    want = dict(zip([t.name for t in outs], ort.InferenceSession(str(whole_dir / f"{name}.onnx")).run(None, feed)))
    got: dict[str, np.ndarray] = {}
    for part, part_ins, part_outs in parts:
        assert {t.name.split("_")[2] for t in part_ins + part_outs if t.name.startswith("past_")} == \
            ({"0"} if part.endswith("_1_of_2") else {"1"})
        values = ort.InferenceSession(str(parts_dir / f"{part}.onnx")).run(
            None, {t.name: got.get(t.name, feed.get(t.name)) for t in part_ins})
        got.update(zip([t.name for t in part_outs], values))
    cut = next(t for t in parts[0][2] if not t.name.startswith("past_"))
    assert cut.dtype == "uint16" and cut.scale and cut.name in {t.name for t in parts[1][1]}
    for out, value in want.items():
        assert np.array_equal(got[out], value), out
