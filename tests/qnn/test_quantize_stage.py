"""The quantize stage on the tiny model: QDQ graphs and encodings per AR graph, PPL float / sim /
QDQ, reruns on an algorithm change, and its error messages."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.qnn.quant import encodings
from tests.conftest import tiny_htp_recipe

RECIPE = tiny_htp_recipe(scheme="w4a16_kv8", algorithm="ALGO")


def built(out: str) -> list[str]:
    return re.findall(r"kiln: \S+:(\S+): built ", out)


@pytest.mark.slow
def test_quantize_stage_outputs_then_algorithm_change_reruns_only_quantize(tiny_htp_project):
    tiny_htp_project.write("tq.yaml", RECIPE.replace("ALGO", "rtn"))
    tiny_htp_project.doit("recipe=tq", "tq:qnn.quantize")
    check_outputs(tiny_htp_project, "rtn")
    for before, algorithm in (("rtn", "seqmse"), ("seqmse", "gptq")):
        tiny_htp_project.write("tq.yaml", RECIPE.replace("ALGO", algorithm))
        explain = tiny_htp_project.doit("explain", "recipe=tq").stdout
        assert re.search(r"tq:qnn.export@ar16 \[\w+…\]: up to date", explain)
        assert f'params.algorithm: "{before}" → "{algorithm}"' in explain
        assert built(tiny_htp_project.doit("recipe=tq", "tq:qnn.quantize").stdout) == ["qnn.quantize"]
        check_outputs(tiny_htp_project, algorithm)
        check_progress(tiny_htp_project, algorithm)


def check_progress(project, algorithm: str) -> None:
    """Built with no terminal attached (doit's output captured): the entry's log still reports the
    sequential calibration layer by layer, with a rate and an estimate, one line per report."""
    ws = project.artifacts / "tq" / "qnn.quantize"
    log = Path(json.loads((ws / ".kiln-entry.json").read_text())["log"]).read_text()
    assert "\r" not in log
    assert re.search(rf"^{algorithm} weights: +100%\|#+\| 2/2 \[\d\d:\d\d<00:00, +[\d.]+(layer/s|s/layer)\]$", log, re.M), log
    assert re.search(r"^perplexity: +100%.*\| 2/2 \[\d\d:\d\d<00:00, +[\d.]+(window/s|s/window)\]$", log, re.M)


def check_outputs(tiny_project, algorithm: str) -> None:
    report = json.loads((tiny_project.artifacts / "tq" / "qnn.quantize" / "quantize.json").read_text())
    assert report["algorithm"] == algorithm and report["ppl_float"] > 1 and report["ppl_sim"] > 1
    assert abs(report["qdq_vs_sim_pct"]) <= 1.0  # the QDQ graph computes what the sim does
    out = tiny_project.artifacts / "tq" / "qnn.quantize"
    assert {g["ar"] for g in report["graphs"]} == {16, 1}
    for g in report["graphs"]:
        assert (out / g["qdq"]).exists() and g["export_check"]["top1_agreement"] == 1.0
        doc = json.loads((out / g["encodings"]).read_text())
        assert encodings.validate(doc, g["encodings"]) == "1.0.0"
        acts = {e["name"]: e for e in doc["activation_encodings"]}
        # Genie copies KV bytes raw: every past in/out pair shares one 8-bit encoding
        assert acts["past_key_0_in"]["bw"] == 8
        assert {k: v for k, v in acts["past_key_0_in"].items() if k != "name"} == \
               {k: v for k, v in acts["past_key_0_out"].items() if k != "name"}
        params = {e["name"]: e for e in doc["param_encodings"]}
        assert params["blocks.0.attn.q.conv.weight"]["enc_type"] == "PER_BLOCK"
        assert params["blocks.0.norm1.weight"]["bw"] == 16
    # the same KV encodings in every AR graph
    docs = [json.loads((out / g["encodings"]).read_text()) for g in report["graphs"]]
    kv = [[e for e in d["activation_encodings"] if e["name"].startswith("past_")] for d in docs]
    assert kv[0] == kv[1] and len(kv[0]) == 2 * 2 * 2
    names = {w["name"]: w for w in report["weights"]}
    assert len(names) == 2 * 7 + 1  # 7 projections per layer + the (tied) LM head
    assert names["model.layers.0.self_attn.q_proj.weight"]["bits"] == 4
    assert names["model.layers.0.self_attn.q_proj.weight"]["granularity"] == "per-block"
    assert names["lm_head.weight"]["bits"] == 8  # the scheme's override for embed_tokens|lm_head
    assert all(w["sqnr_db"] > 5 for w in names.values())


def test_encodings_061_with_per_block_weights_is_refused_at_plan_time(tiny_project):
    tiny_project.write("tq.yaml", RECIPE.replace("ALGO", "rtn").replace("eval_windows: 2",
                                                                        "eval_windows: 2, encodings_version: '0.6.1'"))
    proc = tiny_project.doit("recipe=tq", check=False)
    assert proc.returncode != 0
    assert re.search(r"tq.yaml:7: stages.qnn.quantize.encodings_version: 0.6.1 cannot express the per-block weights "
                     r"of scheme 'w4a16_kv8'; use 1.0.0", proc.stdout + proc.stderr)


def test_qdq_sim_gap_above_tolerance_fails_and_publishes_nothing(tiny_htp_project):
    tiny_htp_project.write("tq.yaml", RECIPE.replace("ALGO", "rtn").replace(
        "eval_windows: 2", "eval_windows: 2, max_qdq_sim_gap_pct: 0.000001, encodings_version: '0.6.1'").replace(
        "use: w4a16_kv8", "use: w8a16_kv8"))
    proc = tiny_htp_project.doit("recipe=tq", "tq:qnn.quantize", check=False)
    assert proc.returncode != 0
    assert re.search(r"qnn.quantize: the QDQ ONNX \(PPL [\d.]+\) and the kiln sim \(PPL [\d.]+\) differ by [-+][\d.]+%, "
                     r"more than max_qdq_sim_gap_pct 1e-06", proc.stdout + proc.stderr)
    assert not (tiny_htp_project.artifacts / "tq" / "qnn.quantize").exists()
