"""qnn.genie_config: every template branch rendered and checked by the real libGenie schema (and the
extension config by its JSON Schema), the checks' failures, and the stage's rerun scope."""
from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("onnxruntime_qnn")

from pipeline.engine.errors import KilnError  # noqa: E402
from pipeline.qnn.genie import GenieError, check_dialog_config, check_ext_config, genie_values, model_values, render_configs  # noqa: E402
from pipeline.qnn.genie_config import QnnGenieConfigParams  # noqa: E402

SMOLLM2 = {"vocab_size": 49152, "hidden_size": 576, "num_attention_heads": 9, "head_dim": 64, "bos_token_id": 1,
           "eos_token_id": 2, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
LLAMA32 = {"vocab_size": 128256, "hidden_size": 2048, "num_attention_heads": 32, "bos_token_id": 128000,
           "eos_token_id": [128001, 128008, 128009],
           "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}


def params(**changes) -> dict:
    p = QnnGenieConfigParams(**changes).model_dump(mode="json")
    return {**p, "context_length": 512, "soc_model": 69, "dsp_arch": "v79"}


def rendered(tmp_path, config: dict, ctx_bins: list[str], weight_sharing: bool = True, **changes):
    (tmp_path / "config.json").write_text(json.dumps(config))
    values = genie_values(params(**changes), tmp_path, ctx_bins, weight_sharing)
    return render_configs("2.51", values)


def test_plain_rope_goes_to_the_backend_and_genie_accepts_it(tmp_path):
    dialog, ext = rendered(tmp_path, SMOLLM2, ["models/weight_sharing_model_1_of_1.serialized.bin"])
    d = dialog["dialog"]
    htp = d["engine"]["backend"]["QnnHtp"]
    assert (htp["kv-dim"], htp["pos-id-dim"], htp["rope-theta"]) == (64, 32, 100000)
    assert "positional-encoding" not in d["engine"]["model"]
    assert d["context"] == {"version": 1, "size": 512, "n-vocab": 49152, "bos-token": 1, "eos-token": 2}
    assert ext["devices"][0]["soc_model"] == 69 and ext["context"]["weight_sharing_enabled"] is True
    check_dialog_config(dialog)
    check_ext_config("2.51", ext)


def test_llama3_rope_scaling_goes_to_positional_encoding_and_genie_accepts_it(tmp_path):
    cores = [{"core_id": 0, "perf_profile": "burst"}, {"core_id": 1, "perf_profile": "balanced", "rpc_control_latency": 0}]
    dialog, ext = rendered(tmp_path, LLAMA32, ["a_qnn.bin", "b_qnn.bin"], weight_sharing=False, cores=cores,
                           sampler={"temp": 0.2, "top_k": 1})
    d = dialog["dialog"]
    pe = d["engine"]["model"]["positional-encoding"]
    assert pe["rope-dim"] == 32 and pe["rope-theta"] == 500000
    assert pe["rope-scaling"] == {"rope-type": "llama3", "factor": 32.0, "low-freq-factor": 1.0,
                                  "high-freq-factor": 4.0, "original-max-position-embeddings": 8192}
    assert "pos-id-dim" not in d["engine"]["backend"]["QnnHtp"]
    assert d["context"]["eos-token"] == [128001, 128008, 128009]
    assert d["sampler"]["temp"] == 0.2 and d["engine"]["model"]["binary"]["ctx-bins"] == ["a_qnn.bin", "b_qnn.bin"]
    assert [c["core_id"] for c in ext["devices"][0]["cores"]] == [0, 1]
    assert ext["context"]["weight_sharing_enabled"] is False
    check_dialog_config(dialog)
    check_ext_config("2.51", ext)


def test_genie_and_the_ext_schema_name_what_is_wrong(tmp_path):
    dialog, ext = rendered(tmp_path, SMOLLM2, ["m.bin"])
    dialog["dialog"]["context"]["size"] = "512"
    with pytest.raises(GenieError, match=r"(?s)schema violation \(-8\).*/context/size': unexpected instance type"):
        check_dialog_config(dialog)
    dialog["dialog"]["context"]["size"] = 512
    dialog["dialog"]["sampler"]["bogus-key"] = 1
    with pytest.raises(GenieError, match="bogus-key"):
        check_dialog_config(dialog)
    ext["devices"][0]["dsp_arch"] = "v80"
    with pytest.raises(KilnError, match=r"at '/devices/0/dsp_arch'"):
        check_ext_config("2.51", ext)


def test_model_values_refuse_what_genie_cannot_express(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**SMOLLM2, "rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn"}}))
    with pytest.raises(KilnError, match="rope_type 'yarn'"):
        model_values(tmp_path, 512)
    with pytest.raises(KilnError, match=r"no Genie templates for QAIRT SDK '2\.10' \(templates/genie/ has 2\.51\)"):
        render_configs("2.10", {})


RECIPE = """\
extends: tiny
target: sm8750
context_length: 64
ar_lengths: [16, 1]
scheme: {use: w4a16_kv8, algorithm: rtn}
stages:
  qnn.genie_config: {sampler: {temp: TEMP}}
"""


def test_stage_writes_checked_configs_and_a_sampler_tweak_reruns_only_it(tiny_project):
    tiny_project.write("tq.yaml", RECIPE.replace("TEMP", "0.8"))
    tiny_project.doit("recipe=tq", "tq:qnn.genie_config")
    out = tiny_project.artifacts / "tq" / "qnn.genie_config"
    dialog = json.loads((out / "htp-model-config-tiny-llama.json").read_text())
    assert dialog["dialog"]["engine"]["model"]["binary"]["ctx-bins"] == ["models/weight_sharing_model_1_of_1.serialized.bin"]
    assert json.loads((out / "htp_backend_ext_config.json").read_text())["devices"][0]["dsp_arch"] == "v79"

    keys = stage_keys(tiny_project)
    tiny_project.write("tq.yaml", RECIPE.replace("TEMP", "0.5"))
    after = stage_keys(tiny_project)
    assert {s for s in keys if keys[s] != after[s]} == {"qnn.genie_config", "bundle"}
    assert 'params.sampler.temp: 0.8 → 0.5' in tiny_project.doit("explain", "recipe=tq").stdout
    assert re.findall(r"kiln: \S+:(\S+): built ", tiny_project.doit("recipe=tq", "tq:qnn.genie_config").stdout) == \
        ["qnn.genie_config"]
    assert json.loads((out / "htp-model-config-tiny-llama.json").read_text())["dialog"]["sampler"]["temp"] == 0.5


def stage_keys(project) -> dict[str, str]:
    listing = project.doit("list", "recipe=tq").stdout
    return dict(re.findall(r"^tq:(\S+)\s+stage \S+ \(key (\w+)…\)", listing, re.M))
