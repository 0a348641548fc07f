"""README command 1: the default recipe end to end on the real SmolLM2-135M-Instruct (slow).

One sequence over one isolated project: a build killed with SIGKILL mid-stage leaves no entry;
the rerun builds the MNN bundle and prints its path and MNN's answer; a second run runs nothing;
`reproduce` rebuilds every stage in an empty store and finds every output file identical.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import new_project, wait_for

from pipeline import ROOT
from pipeline.engine.settings import Settings
from pipeline.engine.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group(__name__)]  # one worker builds the module fixture
DEFAULT = Settings.from_env().default_recipe


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def default_project(tmp_path_factory):
    project = new_project(tmp_path_factory.mktemp("e2e") / "proj")
    shutil.copy(ROOT / "recipes" / f"{DEFAULT}.yaml", project.recipes)
    shutil.copy(ROOT / "recipes" / "_smollm2_135m.yaml", project.recipes)
    return project




def test_default_recipe_end_to_end(default_project):
    """README command 1's build: a quantized MNN bundle, checked in MNN's engine against float."""
    p = default_project
    store = Store(p.store)
    scratch = p.store / "scratch"

    # 1. kill -9 while the model stage is dequantizing: no entry, only scratch.
    with open(p.dir / "killed.log", "w") as log:
        proc = p.popen_doit(stdout=log)
    wait_for(lambda: scratch.is_dir() and any(scratch.iterdir()), 120)
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(store.actions()) == []
    assert len(list(scratch.iterdir())) == 1

    # 2. the rerun takes over the dead lock, builds everything, says where the bundle is and what
    #    MNN's engine answered.
    out = p.doit().stdout
    assert set(re.findall(r"kiln: \S+:(\S+): built ", out)) == {
        "model", "text", "reference", "mnn.export", "mnn.config", "mnn.verify", "mnn.perplexity", "report",
        "mnn.package", "bundle"}
    bundle = p.artifacts / DEFAULT / "bundle"
    tarball = bundle / f"{DEFAULT}.tar.gz"
    shown = Settings.from_env().shown
    assert f"kiln: bundle ready: {shown(bundle / 'to_device')} (tarball {shown(tarball)})" in out
    answer = re.search(r"kiln: mnn\.verify: MNN's engine \(.+\) answers 'What is the capital of France\?': '(.+)'; "
                       r"logits cosine vs float (0\.\d+)", out)
    assert answer and "Paris" in answer.group(1) and float(answer.group(2)) >= 0.8
    to_device = bundle / "to_device"
    manifest = json.loads((to_device / "manifest.json").read_text())
    for name in ("llm.mnn", "llm.mnn.weight", "tokenizer.mtok", "config.json", "llm_config.json", "run.sh"):
        f = to_device / name
        assert manifest["files"][name] == {"sha256": sha256(f), "size": f.stat().st_size}
    verify = json.loads((to_device / "report" / "verify.json").read_text())
    assert verify["matching_prefix"] >= 2 and verify["top1_agrees"]
    summary = json.loads((p.artifacts / DEFAULT / "model" / "summary.json").read_text())
    assert (summary["hidden_size"], summary["num_layers"], summary["num_heads"], summary["num_kv_heads"],
            summary["vocab_size"], summary["parameters"]) == (576, 30, 9, 3, 49152, 134515008)
    first_tar = sha256(tarball)

    # 3. a second run runs nothing.
    again = p.doit()
    assert ": built" not in again.stdout and f"-- {DEFAULT}:model" in again.stdout and f"-- {DEFAULT}:bundle" in again.stdout

    # 4. `reproduce`: every stage, model included, rebuilt in an empty store from its stored inputs,
    #    gives the same bytes, file by file (what CI checks of the default recipe).
    proc = subprocess.run([sys.executable, "-m", "pipeline", "reproduce"], env=p.env(), capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"reproduce {DEFAULT}: 10 of 10 stages identical" in proc.stdout
    assert sha256(tarball) == first_tar and ": built" not in p.doit().stdout


def test_float_model_answers_like_the_reference(default_project):
    """The model stage's HF checkpoint is the real SmolLM2: greedy chat answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert ": built" not in default_project.doit().stdout  # built by the test above
    model_dir = default_project.artifacts / DEFAULT / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert "The capital of France is Paris." in tok.decode(out[0][ids.shape[1]:])
