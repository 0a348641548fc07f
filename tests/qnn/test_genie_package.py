"""qnn.package + bundle on the tiny model: the Genie bundle's to_device/ layout (weight-shared binary under
models/, Genie configs, tokenizer, exact-length prompt files, run.sh with the adb / genie-t2t-run
commands) and the QAIRT runtime libraries: listed without an SDK, copied from QNN_SDK_ROOT."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import tiny_htp_recipe

pytest.importorskip("onnxruntime_qnn")

RECIPE = tiny_htp_recipe({"qnn.compile": "{finalization_level: 1}", "qnn.package": "{prompt_tokens: [16, 100]}"})
LIBS = ["genie-t2t-run", "libGenie.so", "libQnnHtp.so", "libQnnHtpNetRunExtensions.so", "libQnnHtpV79Skel.so",
        "libQnnHtpV79Stub.so", "libQnnSystem.so"]


@pytest.mark.slow  # 40 s: the whole Qualcomm path on the tiny model, twice (ort-qnn, then the qairt doubles)
def test_bundle_is_the_genie_layout_and_sdk_libraries_come_from_qnn_sdk_root(tiny_htp_project, tmp_path):
    tiny_htp_project.write("tq.yaml", RECIPE)
    tiny_htp_project.doit("recipe=tq", "tq:bundle")
    to_device = tiny_htp_project.artifacts / "tq" / "bundle" / "to_device"
    files = {p.relative_to(to_device).as_posix() for p in to_device.rglob("*") if p.is_file()}
    assert {"models/weight_sharing_model_1_of_1.serialized.bin", "models/tiny-llama_ar16_cl64.onnx",
            "htp-model-config-tiny-llama.json", "htp_backend_ext_config.json", "tokenizer.json",
            "lprompt_16.txt", "lprompt_100.txt", "run.sh", "SDK_LIBRARIES.txt", "manifest.json"} <= files
    assert not any(f.startswith("unshared/") or f.endswith("_qnn.bin") for f in files)  # simulator-only binaries
    package = json.loads((tiny_htp_project.artifacts / "tq" / "qnn.package" / "package.json").read_text())
    assert package["prompts"] == {"16": 16, "100": 100}
    [binary] = package["binaries"]
    assert binary["soc_model"] == 69 and sorted(g["ar"] for g in binary["graphs"].values()) == [1, 16]
    assert "soc model 69, HTP v79" in (to_device / "README.md").read_text()
    assert sorted(package["sdk_libraries_missing"]) == LIBS
    run_sh = (to_device / "run.sh").read_text()
    subprocess.run(["sh", "-n", str(to_device / "run.sh")], check=True)
    assert "./genie-t2t-run -c ./htp-model-config-tiny-llama.json --prompt_file prompt.txt" in run_sh
    assert (to_device / "prompt.txt").read_text() == "The capital of France is"
    assert "--prompt_file lprompt_16.txt --profile perf_16.json" in run_sh
    assert "lprompt_100.txt: 100 tokens exceed this build's context (64); skipped" in run_sh
    assert "libQnnHtpV79Skel.so\t$QNN_SDK_ROOT/lib/hexagon-v79/unsigned/libQnnHtpV79Skel.so\tADD" in \
        (to_device / "SDK_LIBRARIES.txt").read_text()

    from qairt_doubles.make_sdk import make_fake_sdk

    from pipeline.qnn.package import sdk_libraries

    sdk = make_fake_sdk(tmp_path / "qairt" / "2.39.0.250926")
    for name, rel in sdk_libraries("v79").items():
        (sdk / rel).parent.mkdir(parents=True, exist_ok=True)
        (sdk / rel).write_bytes(f"stand-in for {name}".encode())
    path = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"
    tiny_htp_project.write("tq.yaml", RECIPE.replace("qnn.compile: {finalization_level: 1}",
                                                 "qnn.compile: {finalization_level: 1, provider: ort-qnn}"))
    tiny_htp_project.doit("recipe=tq", "tq:bundle", QNN_SDK_ROOT=str(sdk), PATH=path)
    assert (to_device / "libQnnHtpV79Skel.so").read_bytes() == b"stand-in for libQnnHtpV79Skel.so"
    assert "Copied from QNN_SDK_ROOT" in (to_device / "SDK_LIBRARIES.txt").read_text()
    manifest = json.loads((to_device / "manifest.json").read_text())
    assert "libGenie.so" in manifest["files"]
