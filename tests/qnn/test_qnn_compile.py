"""qnn.compile with onnxruntime-qnn on the tiny model: a weight-shared SM8750 binary with both AR
graphs and quantized device I/O, unshared binaries the simulator runs like the CPU QDQ graph, and
a SoC change that recompiles without re-exporting or re-quantizing."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.conftest import tiny_htp_recipe

pytest.importorskip("onnxruntime_qnn")

RECIPE = tiny_htp_recipe({"qnn.compile": "{finalization_level: 1}"}, scheme="w4a16_kv8", target="SOC")


def built(out: str) -> list[str]:
    return re.findall(r"kiln: \S+:(\S+): built ", out)


@pytest.mark.slow
def test_qnn_compile_shared_and_unshared_then_soc_change_recompiles_only(tiny_htp_project):
    tiny_htp_project.write("tq.yaml", RECIPE.replace("SOC", "sm8750"))
    tiny_htp_project.doit("recipe=tq", "tq:qnn.compile")
    out = tiny_htp_project.artifacts / "tq" / "qnn.compile"
    report = json.loads((out / "compile.json").read_text())
    assert report["problems"] == []
    shared = report["binaries"]["shared/weight_sharing_model_1_of_1.serialized.bin"]
    assert shared["soc_model"] == 69
    assert sorted(g["ar"] for g in shared["graphs"].values()) == [1, 16]
    assert sorted(b for b in report["binaries"] if b.startswith("unshared/")) == [
        "unshared/tiny-llama_ar16_cl64_qnn.bin", "unshared/tiny-llama_ar1_cl64_qnn.bin"]
    # both EPContext models point at the one shared binary, and HTP runs the whole graph
    for ar in (16, 1):
        model = onnx.load(str(out / "shared" / f"tiny-llama_ar{ar}_cl64.onnx"))
        assert [n.op_type for n in model.graph.node] == ["EPContext"]
        cache = next(a.s for a in model.graph.node[0].attribute if a.name == "ep_cache_context")
        assert cache == b"weight_sharing_model_1_of_1.serialized.bin"

    io = json.loads((out / "io.json").read_text())
    big, one = io["tiny-llama_ar16_cl64"], io["tiny-llama_ar1_cl64"]
    types = {t["name"]: t["dtype"] for t in big["inputs"] + big["outputs"]}
    assert types["input_ids"] == "int32" and types["attention_mask"] == "uint16" and types["logits"] == "uint16"
    assert types["past_key_0_in"] == types["past_value_1_out"] == "uint8"
    # Genie copies KV bytes raw: every KV tensor of every graph has one scale/offset per layer and kind
    kv = {(g, t["name"]): (t["scale"], t["zero_point"]) for g, v in io.items()
          for t in v["inputs"] + v["outputs"] if t["name"].startswith("past_key_0")}
    assert len(kv) == 4 and len(set(kv.values())) == 1
    assert one["inputs"][0]["shape"] == [1, 1]

    simulator_matches_cpu(tiny_htp_project, out, big)
    same_bytes_when_built_again(tiny_htp_project, out)

    tiny_htp_project.write("tq.yaml", RECIPE.replace("SOC", "sm8650"))
    assert built(tiny_htp_project.doit("recipe=tq", "tq:qnn.compile").stdout) == ["qnn.compile"]
    report = json.loads((out / "compile.json").read_text())
    assert report["binaries"]["shared/weight_sharing_model_1_of_1.serialized.bin"]["soc_model"] == 57
    assert report["htp_arch"] == 75


def same_bytes_when_built_again(tiny_htp_project, out: Path) -> None:
    """The entry removed and built again (another scratch dir): identical binaries and EPContext
    models — onnxruntime names graphs by the model's path unless it is loaded from bytes."""
    from pipeline.engine.store import remove_tree

    def digests() -> dict[str, str]:
        return {f.relative_to(out).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
                for f in sorted(out.rglob("*")) if f.is_file() and f.suffix in (".bin", ".onnx")}

    before = digests()
    remove_tree(Path(json.loads((out / ".kiln-entry.json").read_text())["entry"]))
    assert built(tiny_htp_project.doit("recipe=tq", "tq:qnn.compile").stdout) == ["qnn.compile"]
    assert digests() == before


def simulator_matches_cpu(tiny_htp_project, out: Path, io: dict) -> None:
    """The unshared AR-16 binary on the x86 HTP simulator vs the CPU QDQ graph, on the export's test
    vectors quantized to the device I/O."""
    from pipeline.qnn.onnx_check import ort_session
    from pipeline.qnn.ort_qnn import simulator_session

    vectors = np.load(tiny_htp_project.artifacts / "tq" / "qnn.export@ar16" / "test_vectors.npz")
    feed_q, feed_f = {}, {}
    for t in io["inputs"]:
        v = vectors[f"in.{t['name']}"]
        feed_f[t["name"]] = v
        if t["scale"] is None:
            feed_q[t["name"]] = v
            continue
        info = np.iinfo(t["dtype"])
        feed_q[t["name"]] = np.clip(np.rint(v / t["scale"]) + t["zero_point"], info.min, info.max).astype(t["dtype"])
        feed_f[t["name"]] = ((feed_q[t["name"]].astype(np.float32) - t["zero_point"]) * t["scale"]).astype(np.float32)
    htp = simulator_session(out / "unshared" / "tiny-llama_ar16_cl64.onnx", 69, 79).run(None, feed_q)
    cpu = ort_session(tiny_htp_project.artifacts / "tq" / "qnn.quantize" / "tiny-llama_ar16_cl64.qdq.onnx").run(None, feed_f)
    for t, h, c in zip(io["outputs"], htp, cpu):
        h = (h.astype(np.float32) - t["zero_point"]) * t["scale"]
        cos = float((h * c).sum() / (np.linalg.norm(h) * np.linalg.norm(c)))
        assert cos > 0.999, (t["name"], cos)
        if t["name"] == "logits":
            assert (h.argmax(-1) == c.argmax(-1)).mean() == 1.0


def test_qairt_provider_runs_the_sdk_tools_and_checks_what_they_wrote(tiny_htp_project, tmp_path):
    """With the doubles standing in for the QAIRT SDK: the stage converts each float graph with the
    encodings as overrides, quantizes, generates one weight-shared binary — and its libQnnSystem check
    refuses the doubles' stand-in binary, as it would any file that is not a context binary."""
    import os
    import sys

    from qairt_doubles.make_sdk import make_fake_sdk

    sdk = make_fake_sdk(tmp_path / "qairt" / "2.39.0.250926")
    log = tmp_path / "doubles.jsonl"
    tiny_htp_project.write("tq.yaml", RECIPE.replace("SOC", "sm8750").replace("{finalization_level: 1}",
                                                                          "{finalization_level: 1, provider: qairt}"))
    done = tiny_htp_project.doit("recipe=tq", "tq:qnn.compile", check=False, QNN_SDK_ROOT=str(sdk),
                             QAIRT_DOUBLE_LOG=str(log),
                             PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    assert done.returncode != 0
    assert "weight_sharing_model_1_of_1.serialized.bin: not a QNN context binary" in done.stdout + done.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    tools = [c["tool"] for c in calls]
    assert tools == ["qairt-converter", "qairt-quantizer", "qairt-converter", "qairt-quantizer",
                     "qnn-context-binary-generator"]
    convert = calls[0]["argv"]
    assert convert[convert.index("--input_network") + 1].endswith("/tiny-llama_ar16_cl64.onnx")  # the float graph
    assert convert[convert.index("--quantization_overrides") + 1].endswith("tiny-llama_ar16_cl64.encodings.json")
    generate = calls[-1]["argv"]
    assert len(generate[generate.index("--dlc_path") + 1].split(",")) == 2


def test_qairt_provider_without_the_sdk_says_what_to_install(tiny_htp_project):
    tiny_htp_project.write("tq.yaml", RECIPE.replace("SOC", "sm8750").replace("{finalization_level: 1}",
                                                                          "{provider: qairt}"))
    done = tiny_htp_project.doit("list", "recipe=tq", check=False, QNN_SDK_ROOT="")
    assert done.returncode != 0
    message = done.stdout + done.stderr
    assert "QNN_SDK_ROOT is not set" in message and "QAIRT SDK" in message and "provider: ort-qnn" in message
