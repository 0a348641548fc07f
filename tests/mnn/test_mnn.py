"""MNN path: the block-size check, config.json rendering, and the stages on the tiny Llama —
export (sandboxed llmexport), config, verify with MNN's engine — with a thread_num tweak
rerunning only mnn.config and the bundle."""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from pipeline import ROOT
from pipeline.engine.errors import KilnError
from pipeline.mnn.export import check_block
from pipeline.mnn.runtime import MnnConfigParams, render_config

pytest.importorskip("MNN")

SMOLLM2 = {"hidden_size": 576, "tie_word_embeddings": True}


def block_params(block: int, seperate_embed: bool = False) -> dict:
    return {"model": "SmolLM2", "quant_block": block, "seperate_embed": seperate_embed}


def test_block_size_must_divide_the_hidden_size_of_a_tied_model():
    with pytest.raises(KilnError, match=r"block_size 128 does not divide SmolLM2's hidden_size 576.*"
                                        r"\(16, 18, 24, 32, 36, 48, \.\.\.\).*seperate_embed: true"):
        check_block(block_params(128), SMOLLM2, 'r')
    check_block(block_params(64), SMOLLM2, 'r')
    check_block(block_params(0), SMOLLM2, 'r')  # per-channel
    check_block(block_params(128, seperate_embed=True), SMOLLM2, 'r')
    check_block(block_params(128), {**SMOLLM2, "tie_word_embeddings": False}, 'r')


def test_config_renders_every_runtime_setting():
    config = render_config(MnnConfigParams().model_dump(mode="json"))
    assert config["llm_model"] == "llm.mnn" and config["llm_weight"] == "llm.mnn.weight"
    assert config["tokenizer_file"] == "tokenizer.mtok"
    assert {k: config[k] for k in ("backend_type", "thread_num", "precision", "memory", "max_new_tokens", "reuse_kv",
                                   "quant_qkv", "use_mmap", "kvcache_mmap", "sampler_type")} == \
        {"backend_type": "cpu", "thread_num": 4, "precision": "low", "memory": "low", "max_new_tokens": 512,
         "reuse_kv": False, "quant_qkv": 0, "use_mmap": False, "kvcache_mmap": False, "sampler_type": "mixed"}
    assert "tmp_path" not in config
    tuned = MnnConfigParams(backend_type="opencl", thread_num=68, use_mmap=True, tmp_path="/data/local/tmp/mnn",
                            quant_qkv=3, sampler={"type": "topP", "top_p": 0.7})
    config = render_config(tuned.model_dump(mode="json"))
    assert (config["backend_type"], config["thread_num"], config["tmp_path"], config["quant_qkv"]) == \
        ("opencl", 68, "/data/local/tmp/mnn", 3)
    assert (config["sampler_type"], config["top_p"]) == ("topP", 0.7)
    with pytest.raises(ValueError, match="need tmp_path"):
        MnnConfigParams(kvcache_mmap=True)


RECIPE = """\
model: {name: tiny-bpe, hf_dir: MODEL}
target: mnn_arm
scheme: {use: mnn_int4_b64, weights: {bits: 4, granularity: per-block, block_size: BLOCK, symmetric: false}}
eval:
  perplexity: {window: 32, windows: 2}
  tasks: {problems: PROBLEMS, label: Kiln arithmetic demo, limit: 2, budgets: [8, 16]}
stages:
  mnn.config: {thread_num: THREADS}
  mnn.verify: {chat: The capital of Germany is, chat_tokens: 4, min_cosine: 0.5, match_tokens: 1}
"""


def stage_keys(project, recipe: str) -> dict[str, str]:
    listing = project.doit("list", f"recipe={recipe}").stdout
    return dict(re.findall(rf"^{recipe}:(\S+)\s+stage \S+ \(key (\w+)…\)", listing, re.M))


def recipe(model_dir, block: int, threads: int) -> str:
    return (RECIPE.replace("MODEL", str(model_dir)).replace("BLOCK", str(block)).replace("THREADS", str(threads))
            .replace("PROBLEMS", str(ROOT / "recipes" / "tasks" / "kiln_arithmetic_demo.jsonl")))


@pytest.mark.slow
def test_stages_on_the_tiny_llama_and_a_thread_tweak_reruns_only_the_config(tiny_project, tiny_bpe_model_dir, htp_store):
    tiny_project.shared_store = htp_store  # the tiny models' model stage, built once per session
    tiny_project.write("tm.yaml", recipe(tiny_bpe_model_dir, 64, 4))
    tiny_project.doit("recipe=tm")
    out = tiny_project.artifacts / "tm"
    export = json.loads((out / "mnn.export" / "export.json").read_text())
    keys = stage_keys(tiny_project, "tm")
    # the uuid comes from the export's bytes, never from the action key (which no output may name)
    mark = json.loads((out / "mnn.export" / ".kiln-entry.json").read_text())
    assert uuid.UUID(export["uuid"]).version == 5 and mark["key"][:12] == keys["mnn.export"]
    for f in (Path(mark["entry"]) / "out").iterdir():
        assert mark["key"].encode() not in f.read_bytes() and mark["key"][:16].encode() not in f.read_bytes()
    assert export["flags"][:4] == ["--quant_bit", "4", "--quant_block", "64"]
    import MNN

    assert MNN.get_model_uuid(str(out / "mnn.export" / "llm.mnn")) == export["uuid"]
    verify = json.loads((out / "mnn.verify" / "verify.json").read_text())
    assert verify["runtime"]["sampler_type"] == "greedy"  # the answer in the README is reproducible
    assert verify["logits_cosine"] >= 0.5 and verify["matching_prefix"] >= 1
    assert json.loads((out / "mnn.verify" / "timings.json").read_text())["decode_tokens_per_s"] > 0
    # the shared perplexity protocol through MNN's engine: 2 windows of 32, 15 scored positions each
    ppl = json.loads((out / "mnn.perplexity" / "perplexity.json").read_text())
    reference = json.loads((out / "reference" / "reference.json").read_text())
    assert ppl["backend"] == "mnn" and ppl["tokens_scored"] == 30 == reference["float"]["tokens_scored"]
    assert 0 < ppl["kld"] < 1 and ppl["same_top_pct"] > 50  # 4-bit weights: close to the float model, not equal
    assert abs(ppl["ppl"] / reference["float"]["ppl"] - 1) < 0.5
    # task accuracy through MNN's engine: 2 problems x 3 prompts x 2 budgets, replies within their budget
    tasks = json.loads((out / "mnn.tasks" / "tasks.json").read_text())
    assert tasks["type"] == "MNN" and tasks["problems"] == 2 and set(tasks["accuracy"]["budget_aware"]) == {"8", "16"}
    answers = [json.loads(line) for line in (out / "mnn.tasks" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 12 and all(a["tokens"] <= a["budget"] for a in answers)
    assert "tasks-step_by_step.svg" in (out / "report" / "index.html").read_text()
    to_device = out / "bundle" / "to_device"
    assert json.loads((to_device / "config.json").read_text())["thread_num"] == 4
    assert {"llm.mnn", "llm.mnn.weight", "tokenizer.mtok", "llm_config.json", "report", "run.sh"} <= \
        {p.name for p in to_device.iterdir()}
    subprocess.run(["sh", "-n", str(to_device / "run.sh")], check=True)
    readme = (to_device / "README.md").read_text()
    assert "4-bit weights, block 64, asymmetric" in readme and verify["chat"]["answer"].strip() in readme

    assert not (to_device / "report" / "timings.json").exists()  # host timings stay out of the bundle
    same_tarball_when_built_again(tiny_project, out)

    tiny_project.write("tm.yaml", recipe(tiny_bpe_model_dir, 64, 2))
    after = stage_keys(tiny_project, "tm")
    assert {s for s in keys if keys[s] != after[s]} == {"mnn.config", "bundle"}
    built = re.findall(r"kiln: \S+:(\S+): built ", tiny_project.doit("recipe=tm").stdout)
    assert built == ["mnn.config", "bundle"]
    assert json.loads((to_device / "config.json").read_text())["thread_num"] == 2


def same_tarball_when_built_again(project, out) -> None:
    """Every stage after the model built again from scratch: the same tarball, byte for byte
    (llm.mnn's uuid comes from its content; timings are in info/, outside the output)."""
    from pipeline.engine.store import remove_tree

    tarball = out / "bundle" / "tm.tar.gz"
    before = hashlib.sha256(tarball.read_bytes()).hexdigest()
    for stage in ("mnn.export", "mnn.config", "mnn.verify", "mnn.package", "bundle"):
        remove_tree(Path(json.loads((out / stage / ".kiln-entry.json").read_text())["entry"]))
    built = re.findall(r"kiln: \S+:(\S+): built ", project.doit("recipe=tm").stdout)
    assert sorted(built) == ["bundle", "mnn.config", "mnn.export", "mnn.package", "mnn.verify"]
    assert hashlib.sha256(tarball.read_bytes()).hexdigest() == before


def test_a_block_breaking_tied_embeddings_or_a_wordlevel_tokenizer_is_refused_before_the_export(
        tiny_project, tiny_bpe_model_dir, tiny_model_dir, htp_store):
    tiny_project.shared_store = htp_store
    tiny_project.write("tb.yaml", recipe(tiny_bpe_model_dir, 48, 4))
    failed = tiny_project.doit("recipe=tb", check=False)
    assert failed.returncode != 0
    assert "scheme.weights.block_size 48 does not divide tiny-bpe's hidden_size 64" in failed.stdout + failed.stderr
    assert not (tiny_project.artifacts / "tb" / "mnn.export").exists()
    tiny_project.write("tw.yaml", recipe(tiny_model_dir, 64, 4))
    failed = tiny_project.doit("recipe=tw", check=False)
    assert failed.returncode != 0
    assert re.search(r"tokenizer.json: a WordLevel tokenizer: llmexport exports BPE and SentencePiece tokenizers only",
                     failed.stdout + failed.stderr)
    assert not (tiny_project.artifacts / "tw" / "mnn.export").exists()


def test_a_scheme_llmexport_cannot_do_is_refused_at_plan_time(tiny_project):
    tiny_project.write("t2.yaml", "extends: tiny\ntarget: mnn_arm\nscheme: {use: mnn_int4_b64, weights: {bits: 2}, "
                                  "algorithm: gptq}\n")
    failed = tiny_project.doit("list", "recipe=t2", check=False)
    assert failed.returncode != 0
    assert re.search(r"t2.yaml:3: scheme 'mnn_int4_b64' for MNN: weights.bits 2 .*; algorithm gptq",
                     failed.stdout + failed.stderr)


def test_recipe_text_lands_in_run_sh_as_one_quoted_word(tmp_path):
    from pipeline.engine.templating import environment

    nasty = "it's $(touch " + str(tmp_path / "pwned") + ") `id` \"q\""
    script = environment().from_string('Q={{ v | shquote }}\nprintf %s "$Q"\n').render(v=nasty)
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout == nasty and not (tmp_path / "pwned").exists()
    for template in ("mnn/run.sh.j2", "llamacpp/run.sh.j2", "genie/run.sh.j2"):
        from pipeline.engine.templating import TEMPLATES

        text = (TEMPLATES / template).read_text()
        assert re.findall(r"\{\{ *(?:chat|verify\.prompt|prompt|device_dir) *\}\}", text) == [], template
