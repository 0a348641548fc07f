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


@pytest.mark.slow
def test_simulator_and_genie_agree_with_the_float_model(tiny_htp_project, tmp_path):
    problems = tmp_path / "problems.jsonl"  # short: the tiny graphs hold 64 tokens, prompt and reply together
    problems.write_text('{"question": "w1 w2 ?", "answer": 3}\n{"question": "w4 w5 ?", "answer": 9}\n')
    tiny_htp_project.write("tv.yaml", RECIPE + f"eval:\n  tasks: {{problems: {problems}, label: tiny, limit: 2, "
                                               "budgets: [8, 16], prompts: [step_by_step]}\n")
    tiny_htp_project.doit("recipe=tv", "tv:qnn.verify", "tv:qnn.perplexity", "tv:qnn.tasks")
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
    # the shared perplexity protocol on the QDQ graph (AR-16 steps over windows of 32 in a context of 64)
    ppl = json.loads((out.parent / "qnn.perplexity" / "perplexity.json").read_text())
    reference = json.loads((out.parent / "reference" / "reference.json").read_text())
    assert ppl["tokens_scored"] == reference["float"]["tokens_scored"] == 30
    assert ppl["kld"] < 0.05 and ppl["same_top_pct"] >= 80 and abs(ppl["ppl"] / reference["float"]["ppl"] - 1) < 0.1
    compiled = out.parent / "qnn.compile"
    shipped = sum(b.stat().st_size for b in (compiled / "shared").glob("*.bin"))
    assert ppl["size_bytes"] == shipped > 0 and shipped < sum(b.stat().st_size for b in compiled.rglob("*.bin"))
    # task accuracy through the QDQ graphs: AR-16 prefill, AR-1 decode, one reply per problem cut at 8 and 16
    tasks = json.loads((out.parent / "qnn.tasks" / "tasks.json").read_text())
    assert tasks["type"] == "QDQ" and set(tasks["accuracy"]) == {"step_by_step"} and tasks["problems"] == 2
    answers = [json.loads(line) for line in (out.parent / "qnn.tasks" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 4 and all(a["tokens"] <= a["budget"] for a in answers)


@pytest.mark.slow  # 60-90 s: compile, simulator and Genie over four part graphs
def test_a_model_cut_in_two_parts_runs_on_the_simulator_and_in_genie(tiny_htp_project):
    """num_splits: 2 on the 2-layer model: part 1 = embedding + layer 0, part 2 = layer 1 + norm + LM
    head; each part's AR graphs share one binary; the simulator chains the parts and Genie, given
    every part, answers like the float model (and like the uncut build)."""
    tiny_htp_project.write("split.yaml", RECIPE.replace("{finalization_level: 1}", "{finalization_level: 1, num_splits: 2}"))
    tiny_htp_project.write("tv.yaml", RECIPE)
    tiny_htp_project.doit("recipe=tv", "tv:qnn.verify", "tv:qnn.perplexity")
    tiny_htp_project.doit("recipe=split", "split:qnn.verify", "split:qnn.genie_config", "split:qnn.package")
    compiled = tiny_htp_project.artifacts / "split" / "qnn.compile"
    io = json.loads((compiled / "io.json").read_text())
    assert sorted(io) == ["tiny-llama_ar16_cl64_1_of_2", "tiny-llama_ar16_cl64_2_of_2",
                          "tiny-llama_ar1_cl64_1_of_2", "tiny-llama_ar1_cl64_2_of_2"]
    first, second = io["tiny-llama_ar16_cl64_1_of_2"], io["tiny-llama_ar16_cl64_2_of_2"]
    names = {g: {d: [t["name"] for t in v[d]] for d in ("inputs", "outputs")} for g, v in (("1", first), ("2", second))}
    handed = [t for t in first["outputs"] if not t["name"].startswith("past_")]
    assert [t["name"] for t in handed] == [n for n in names["2"]["inputs"] if not n.startswith(("past_", "att", "pos"))]
    assert handed[0]["dtype"] == "uint16" and handed[0]["scale"] > 0 and handed[0]["shape"] == [1, 16, 64]
    assert {"input_ids", "past_key_0_in"} <= set(names["1"]["inputs"]) and "logits" in names["2"]["outputs"]
    assert "past_key_1_in" not in names["1"]["inputs"] and "input_ids" not in names["2"]["inputs"]
    report = json.loads((compiled / "compile.json").read_text())
    assert not report["problems"]
    shared = {b: v for b, v in report["binaries"].items() if b.startswith("shared/")}
    assert sorted(shared) == [f"shared/weight_sharing_model_{i}_of_2.serialized.bin" for i in (1, 2)]
    assert all(sorted(g["ar"] for g in v["graphs"].values()) == [1, 16] and v["soc_model"] == 69 for v in shared.values())

    verify = json.loads((tiny_htp_project.artifacts / "split" / "qnn.verify" / "verify.json").read_text())
    assert verify["numerics"]["simulator_vs_cpu_qdq"]["top1_agreement"] == 1.0
    [answer] = verify["genie"]["answers"]
    assert answer["match"] and answer["genie_tokens"] == 3, answer
    whole = json.loads((tiny_htp_project.artifacts / "tv" / "qnn.verify" / "verify.json").read_text())
    assert answer["genie"] == whole["genie"]["answers"][0]["genie"]  # the uncut build's answer
    package = tiny_htp_project.artifacts / "split" / "qnn.package"
    binaries = json.loads((package / "package.json").read_text())["binaries"]
    assert [b["file"] for b in binaries] == ["models/weight_sharing_model_1_of_2.serialized.bin",
                                             "models/weight_sharing_model_2_of_2.serialized.bin"]
    assert [b["layers"] for b in binaries] == ["0-0", "1-1"] and all((package / b["file"]).is_file() for b in binaries)
    assert "| `models/weight_sharing_model_2_of_2.serialized.bin` | part 2 of 2 (decoder layers 1-1)" in (
        package / "README.md").read_text()
    dialog = json.loads((tiny_htp_project.artifacts / "split" / "qnn.genie_config" / "htp-model-config-tiny-llama.json")
                        .read_text())
    assert dialog["dialog"]["engine"]["model"]["binary"]["ctx-bins"] == [
        "models/weight_sharing_model_1_of_2.serialized.bin", "models/weight_sharing_model_2_of_2.serialized.bin"]
