"""The quantize stage's aimet engine (aimet-onnx's QuantizationSimModel) on the tiny model: its
encodings pass Kiln's validation and device rules, and Kiln's QDQ graph computes what AIMET's sim
does; plus the device rules every engine's encodings must pass."""
from __future__ import annotations

import json
import re

import pytest

from pipeline.engine.errors import KilnError
from pipeline.qnn.quant import encodings
from pipeline.qnn.quant.encodings import Encoding
from tests.conftest import tiny_htp_recipe

RECIPE = tiny_htp_recipe(scheme="w4a16_kv8", algorithm="ALGO", scheme_extra="engine: aimet")


@pytest.mark.parametrize("algorithm", ["rtn", "seqmse"])
@pytest.mark.slow
def test_aimet_engine_encodings_validate_and_qdq_matches_aimet_sim(tiny_htp_project, algorithm):
    tiny_htp_project.write("ta.yaml", RECIPE.replace("ALGO", algorithm))
    tiny_htp_project.doit("recipe=ta", "ta:qnn.quantize")
    out = tiny_htp_project.artifacts / "ta" / "qnn.quantize"
    report = json.loads((out / "quantize.json").read_text())
    assert report["engine"] == "aimet" and report["algorithm"] == algorithm
    assert 1 < report["ppl_float"] and 1 < report["ppl_sim"]
    assert abs(report["qdq_vs_sim_pct"]) <= 1.0  # Kiln's QDQ graph computes what AIMET's sim does
    docs = [json.loads((out / g["encodings"]).read_text()) for g in report["graphs"]]
    assert [encodings.validate(d, "x") for d in docs] == ["1.0.0", "1.0.0"] and docs[0] == docs[1]
    acts = {e["name"]: e for e in docs[0]["activation_encodings"]}
    params = {e["name"]: e for e in docs[0]["param_encodings"]}
    assert acts["past_value_1_in"]["bw"] == 8 and acts["past_value_1_in"]["scale"] == acts["past_value_1_out"]["scale"]
    assert params["blocks.0.mlp.down.conv.weight"]["enc_type"] == "PER_BLOCK"
    assert params["blocks.0.mlp.down.conv.weight"]["block_size"] == 64
    assert params["lm_head.conv.weight"]["bw"] == 8  # the scheme's embed_tokens|lm_head override, applied in AIMET
    # AIMET's activation quantizers on the embedding table and norm gammas: moved to params
    for name in ("embed.weight", "blocks.0.norm1.weight"):  # (the tiny model's equal gammas share one)
        assert name not in acts and params[name]["bw"] == 16 and not params[name]["is_sym"]


def test_aimet_engine_refuses_gptq_at_plan_time(tiny_project):
    tiny_project.write("ta.yaml", RECIPE.replace("ALGO", "gptq"))
    proc = tiny_project.doit("recipe=ta", check=False)
    assert proc.returncode != 0
    assert re.search(r"ta.yaml:5: scheme.engine: aimet \(scheme 'w4a16_kv8'\) does not support algorithm 'gptq' "
                     r"\(the aimet engine runs rtn, seqmse\)", proc.stdout + proc.stderr)


def kv(name: str, scale: float) -> Encoding:
    return Encoding(name, 8, True, (scale,), (-128,))


def test_device_rules_accept_shared_kv_and_reject_what_htp_or_genie_cannot_run():
    good = {"past_key_0_in": kv("past_key_0_in", 0.1), "past_key_0_out": kv("past_key_0_out", 0.1)}
    w8 = {"w": Encoding("w", 8, True, (0.1, 0.2), (-128, -128))}
    encodings.check_device_rules(good, w8, 8, {"w"}, "here")
    cases = [({**good, "past_key_0_out": kv("past_key_0_out", 0.2)}, w8, 8, "past_key_0_in and past_key_0_out must share"),
             ({"past_key_0_in": good["past_key_0_in"]}, w8, 8, "past_key_0_in and past_key_0_out must share"),
             (good, w8, 16, "past_key_0_in: 8-bit, the scheme's kv_cache is 16-bit"),
             (good, {"w": Encoding("w", 8, False, (0.1,), (-3,))}, 8, "w: int8 weights must be symmetric"),
             (good, {"w": Encoding("w", 4, True, (0.1,), (-8,))}, 8, "w: int4 weights must be per-channel or per-block")]
    for acts, params, bits, message in cases:
        with pytest.raises(KilnError, match=re.escape(message)):
            encodings.check_device_rules(acts, params, bits, {"w"}, "here")
