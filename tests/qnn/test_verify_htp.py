"""qnn.verify on the tiny model: the unshared binaries on the x86 HTP simulator agree with the
float model and the CPU QDQ graphs, and the real Genie runtime, driven by the bundle's config,
answers like the float model."""
from __future__ import annotations

import json

import pytest

from tests.conftest import tiny_htp_recipe

pytest.importorskip("onnxruntime_qnn")

RECIPE = tiny_htp_recipe({"qnn.compile": "{finalization_level: 1}", "qnn.verify": (
    '{text_tokens: 20, decode_steps: 2, prompts: ["w1 w2 w3 w4"], max_new_tokens: 3, match_tokens: 2}')})


def test_simulator_and_genie_agree_with_the_float_model(tiny_htp_project):
    tiny_htp_project.write("tv.yaml", RECIPE)
    tiny_htp_project.doit("recipe=tv", "tv:qnn.verify")
    out = tiny_htp_project.artifacts / "tv" / "qnn.verify"
    report = json.loads((out / "verify.json").read_text())
    n = report["numerics"]
    assert n["tokens"] == 21 and n["decode_steps"] == 2  # BOS + 20: two AR-16 prefill steps, then AR-1
    # HTP computes inside the graph in its own precision (fused RMSNorm, float16 where not quantized)
    assert n["simulator_vs_cpu_qdq"]["top1_agreement"] == 1.0 and n["simulator_vs_cpu_qdq"]["cosine_mean"] > 0.99
    assert n["simulator_vs_float"]["top1_agreement"] >= 0.9
    [answer] = report["genie"]["answers"]
    assert answer["match"], answer
    assert answer["genie_tokens"] == 3
    assert json.loads((out / "timings.json").read_text())["genie"][0]["tokens_per_s_simulator"] > 0
    dialog = json.loads((out / "genie" / "dialog.json").read_text())["dialog"]
    assert dialog["engine"]["model"]["binary"]["ctx-bins"] == ["tiny-llama_ar16_cl64_qnn.bin", "tiny-llama_ar1_cl64_qnn.bin"]
    assert (out / "genie.log").exists()
    assert "| simulator vs cpu qdq | 1.000 |" in (out / "report.md").read_text()
