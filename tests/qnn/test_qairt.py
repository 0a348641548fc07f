"""The `qairt` qnn.compile provider (pipeline/qnn/qairt.py) against test doubles of the QAIRT SDK tools.

The SDK cannot be installed here, so tests/qnn/qairt_doubles stands in for its three tools: they parse argv
with the real flag names, check their inputs, log their argv, and write stand-in outputs. These tests pin
the exact command lines Kiln runs and the configs it writes, and the errors a user sees.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qairt_doubles.make_sdk import DOUBLES, make_fake_sdk

from pipeline.engine.errors import KilnError, ToolMissing
from pipeline.qnn import qairt
from pipeline.qnn.quant import encodings as enc

HOST = "x86_64-linux-clang"
GRAPHS = ("tiny_ar4_cl16", "tiny_ar1_cl16")  # widest first, as compile_shared expects


@pytest.fixture
def sdk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake SDK as $QNN_SDK_ROOT; the doubles log to $QAIRT_DOUBLE_LOG and run on this interpreter."""
    root = make_fake_sdk(tmp_path / "qairt" / "2.39.0.250926")
    monkeypatch.setenv("QNN_SDK_ROOT", str(root))
    monkeypatch.setenv("QAIRT_DOUBLE_LOG", str(tmp_path / "doubles.jsonl"))
    # The doubles' `#!/usr/bin/env python3` must find a python with onnx: the venv's.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return root


def logged(tmp_path: Path) -> list[dict]:
    log = tmp_path / "doubles.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def qdq_graph(path: Path, seq: int) -> Path:
    """x -> Q -> DQ -> MatMul(DQ(int8 weight)) -> y: the smallest QDQ graph with an activation and a weight."""
    weight = numpy_helper.from_array(np.arange(-8, 8, dtype=np.int8).reshape(4, 4), "layer0.weight")
    consts = [weight, numpy_helper.from_array(np.array(0.01, np.float32), "x_scale"),
              numpy_helper.from_array(np.array(0, np.uint16), "x_zero"),
              numpy_helper.from_array(np.array(0.02, np.float32), "w_scale"),
              numpy_helper.from_array(np.array(0, np.int8), "w_zero")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["layer0.weight", "w_scale", "w_zero"], ["w_dq"]),
             helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, 4])], consts)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    return path


def encodings_for(path: Path, activations: tuple[str, ...] = ("x", "y"), version: str = "1.0.0") -> Path:
    acts = [enc.Encoding(name, 16, False, (0.01,), (-32768,)) for name in activations]
    params = [enc.Encoding("layer0.weight", 8, True, (0.02,), (-128,))]
    enc.write(path, enc.render(acts, params, version, {"activation_bitwidth": 16}))
    return path


def graph_inputs(tmp_path: Path, **encodings_kw) -> list[tuple[str, Path, Path]]:
    return [(name, qdq_graph(tmp_path / f"{name}.onnx", seq),
             encodings_for(tmp_path / f"{name}.encodings", **encodings_kw))
            for name, seq in zip(GRAPHS, (4, 1))]


def test_compile_shared_runs_the_three_tools_with_real_flags(sdk: Path, tmp_path: Path) -> None:
    graphs = graph_inputs(tmp_path)
    out = tmp_path / "compiled"
    result = qairt.compile_shared(qairt.sdk_root(), graphs, 69, "v79", out, vtcm_mb=8)

    assert result == out.resolve() / "weight_sharing_model_1_of_1.serialized.bin"
    assert result.read_bytes().startswith(b"KILN-TEST-DOUBLE-CONTEXT-BINARY\n")
    bin_dir, lib = sdk / "bin" / HOST, sdk / "lib" / HOST
    out = out.resolve()
    expected = []
    for name, onnx_path, enc_path in graphs:
        converted, quantized = out / "converted" / f"{name}.dlc", out / "quantized" / f"{name}.dlc"
        expected += [
            ("qairt-converter", [str(bin_dir / "qairt-converter"), "--input_network", str(onnx_path.resolve()),
                                 "--quantization_overrides", str(enc_path.resolve()), "--output_path", str(converted)]),
            ("qairt-quantizer", [str(bin_dir / "qairt-quantizer"), "--input_dlc", str(converted),
                                 "--output_dlc", str(quantized), "--float_fallback", "--float_bitwidth", "16"]),
        ]
    dlcs = ",".join(str(out / "quantized" / f"{name}.dlc") for name in GRAPHS)
    expected.append(("qnn-context-binary-generator", [
        str(bin_dir / "qnn-context-binary-generator"), "--backend", str(lib / "libQnnHtp.so"),
        "--model", str(lib / "libQnnModelDlc.so"), "--dlc_path", dlcs,
        "--config_file", str(out / "qnn_context_binary_config.json"),
        "--input_output_tensor_mem_type", "memhandle",
        "--binary_file", "weight_sharing_model_1_of_1.serialized", "--output_dir", str(out)]))
    calls = logged(tmp_path)
    assert [(c["tool"], c["argv"]) for c in calls] == expected
    assert {c["cwd"] for c in calls} == {str(out)}

    outer = json.loads((out / "qnn_context_binary_config.json").read_text())
    assert outer == {"backend_extensions": {"shared_library_path": str(lib / "libQnnHtpNetRunExtensions.so"),
                                            "config_file_path": str(out / "htp_backend_ext_compile.json")}}
    inner = json.loads((out / "htp_backend_ext_compile.json").read_text())
    assert inner == {
        "devices": [{"soc_model": 69, "dsp_arch": "v79",
                     "cores": [{"core_id": 0, "perf_profile": "burst", "rpc_control_latency": 100}]}],
        "memory": {"mem_type": "shared_buffer"},
        "context": {"weight_sharing_enabled": True},
        "graphs": [{"graph_names": list(GRAPHS), "vtcm_mb": 8, "O": 3}],
    }
    # The quantized DLCs carry the graph names and the overrides through both steps.
    for name, onnx_path, enc_path in graphs:
        dlc = json.loads((out / "quantized" / f"{name}.dlc").read_text())
        assert (dlc["graph_name"], dlc["source_onnx"], dlc["quantization_overrides"], dlc["quantized"]) == \
            (name, str(onnx_path.resolve()), str(enc_path.resolve()), True)


def test_encodings_061_are_accepted(sdk: Path, tmp_path: Path) -> None:
    graphs = graph_inputs(tmp_path, version="0.6.1")[:1]
    assert qairt.compile_shared(qairt.sdk_root(), graphs, 57, "v75", tmp_path / "out").is_file()


def test_sdk_root_unset_says_where_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QNN_SDK_ROOT", raising=False)
    with pytest.raises(ToolMissing) as err:
        qairt.sdk_root()
    message = str(err.value)
    for needed in ("QNN_SDK_ROOT", "export QNN_SDK_ROOT=", "Qualcomm AI Runtime SDK", "qpm.qualcomm.com",
                   "softwarecenter.qualcomm.com", "provider: ort-qnn"):
        assert needed in message
    assert not qairt.available()


def test_sdk_without_context_binary_generator_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_fake_sdk(tmp_path / "sdk", omit=["qnn-context-binary-generator"])
    monkeypatch.setenv("QNN_SDK_ROOT", str(root))
    with pytest.raises(ToolMissing, match="qnn-context-binary-generator") as err:
        qairt.sdk_root()
    assert str(root / "bin" / HOST / "qnn-context-binary-generator") in str(err.value)
    assert not qairt.available()


def test_sdk_version_from_sdk_yaml_else_folder_name(tmp_path: Path) -> None:
    assert qairt.sdk_version(make_fake_sdk(tmp_path / "a", version="2.39.0", build_id="250926")) == "2.39.0+250926"
    assert qairt.sdk_version(make_fake_sdk(tmp_path / "b", version="2.46.0.260424", build_id=None)) == "2.46.0.260424"
    assert qairt.sdk_version(make_fake_sdk(tmp_path / "2.37.0.250724", version=None)) == "2.37.0.250724"


def test_available_with_a_complete_sdk(sdk: Path) -> None:
    assert qairt.available()
    assert qairt.sdk_root() == sdk


def test_converter_failure_names_the_tool_and_its_error(sdk: Path, tmp_path: Path) -> None:
    graphs = graph_inputs(tmp_path, activations=("x", "y", "not_in_graph"))
    with pytest.raises(KilnError) as err:
        qairt.compile_shared(qairt.sdk_root(), graphs, 69, "v79", tmp_path / "out")
    message = str(err.value)
    assert message.startswith("qairt-converter exited with 1")
    assert "encodings for tensors not in the graph: not_in_graph" in message
    assert [c["tool"] for c in logged(tmp_path)] == ["qairt-converter"]  # nothing ran after the failure


def test_tool_writing_nothing_is_an_error(sdk: Path, tmp_path: Path) -> None:
    # A quantizer that exits 0 but writes no DLC (a broken SDK install, say) must not pass silently.
    quantizer = sdk / "bin" / HOST / "qairt-quantizer"
    quantizer.unlink()
    quantizer.write_text("#!/bin/sh\necho 'quantized nothing' >&2\n")
    quantizer.chmod(0o755)
    wrote_nothing = r"(?s)qairt-quantizer exited 0 but wrote no .*tiny_ar4_cl16.dlc\nquantized nothing"
    with pytest.raises(KilnError, match=wrote_nothing):
        qairt.compile_shared(qairt.sdk_root(), graph_inputs(tmp_path)[:1], 69, "v79", tmp_path / "out")


def test_double_rejects_unknown_flag_like_the_real_tool(tmp_path: Path) -> None:
    onnx_path = qdq_graph(tmp_path / "g.onnx", 1)
    proc = subprocess.run([sys.executable, str(DOUBLES / "qairt-converter"), "--input_network", str(onnx_path),
                           "--no_such_flag"], capture_output=True, text=True,
                          env={**os.environ, "QAIRT_DOUBLE_LOG": ""})
    assert proc.returncode == 2
    assert "usage: qairt-converter" in proc.stderr and "unrecognized arguments: --no_such_flag" in proc.stderr
    assert not (tmp_path / "g.dlc").exists()


def test_generator_double_checks_the_weight_sharing_config(sdk: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    qairt.compile_shared(qairt.sdk_root(), graph_inputs(tmp_path), 69, "v79", out)
    inner = out / "htp_backend_ext_compile.json"
    config = json.loads(inner.read_text())
    del config["context"]["weight_sharing_enabled"]
    inner.write_text(json.dumps(config))
    call = logged(tmp_path)[-1]
    proc = subprocess.run(call["argv"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "context.weight_sharing_enabled" in proc.stderr
