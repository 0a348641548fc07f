"""The quantize stage on the tiny model: every algorithm runs through doit and reports PPL and SQNR."""
from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("algorithm", ["rtn", "seqmse", "gptq"])
def test_quantize_stage_reports_ppl_and_sqnr(tiny_project, algorithm):
    tiny_project.write("tq.yaml", f"""\
        extends: tiny
        target: sm8750
        context_length: 64
        ar_lengths: [16, 1]
        scheme: {{use: w4a16_kv8, algorithm: {algorithm}}}
        stages:
          quantize: {{calibration_samples: 2, calibration_tokens: 16, eval_ctx: 32, eval_windows: 4}}
        """)
    tiny_project.doit("recipe=tq", "tq:quantize")
    report = json.loads((tiny_project.artifacts / "tq" / "quantize" / "quantize.json").read_text())
    assert report["algorithm"] == algorithm and report["ppl_float"] > 1 and report["ppl_quantized"] > 1
    names = {w["name"]: w for w in report["weights"]}
    assert len(names) == 2 * 7 + 1  # 7 projections per layer + the (tied) LM head
    assert names["model.layers.0.self_attn.q_proj.weight"]["bits"] == 4
    assert names["model.layers.0.self_attn.q_proj.weight"]["granularity"] == "per-block"
    assert names["lm_head.weight"]["bits"] == 8  # the scheme's override for embed_tokens|lm_head
    assert all(w["sqnr_db"] > 5 for w in names.values())
