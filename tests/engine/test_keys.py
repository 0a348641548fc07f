"""Keys: stable under reformatting, sensitive to everything that changes an output."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from pipeline import ROOT
from pipeline.engine import tools
from pipeline.engine.hashing import StatCache
from pipeline.engine.keys import compute_key, diff
from pipeline.engine.plan import plan
from pipeline.registry import load_recipe, stage_class


def keys(project, monkeypatch, name="tiny") -> dict[str, str]:
    return {s.stage: s.key for s in plan(load_recipe(name, project.settings(monkeypatch)))}


def test_key_is_256_bit_hex(tiny_project, monkeypatch):
    for key in keys(tiny_project, monkeypatch).values():
        assert re.fullmatch(r"[0-9a-f]{64}", key), key


def test_reformatting_changes_no_key(tiny_project, monkeypatch, tiny_model_dir):
    before = keys(tiny_project, monkeypatch)
    # Same values: comments, flow vs block style, key order, quoting, and the
    # base inlined instead of extended.
    tiny_project.write("tiny.yaml", f"""\
        # rewritten by hand
        stages:
          bundle:
            compress_level: 1   # fast
        description: "tiny random Llama"
        scheme: fp32
        target: {{use: x86_64}}
        model: {{hf_dir: "{tiny_model_dir}", name: tiny-llama}}
        """)
    assert keys(tiny_project, monkeypatch) == before


def test_param_change_rekeys_stage_and_downstream_only(tiny_project, monkeypatch):
    before = keys(tiny_project, monkeypatch)
    tiny_project.write("tiny.yaml", "extends: _tiny\ndescription: tiny random Llama\nstages: {bundle: {compress_level: 2}}\n")
    after = keys(tiny_project, monkeypatch)
    assert after["model"] == before["model"] and after["bundle"] != before["bundle"]
    tiny_project.write("tiny.yaml", "extends: _tiny\ndescription: tiny random Llama\nmodel: {dtype: bfloat16}\n"
                       "stages: {bundle: {compress_level: 1}}\n")
    after = keys(tiny_project, monkeypatch)
    assert after["model"] != before["model"] and after["bundle"] != before["bundle"]


def test_source_content_change_rekeys(tiny_project, monkeypatch, tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    tiny_project.write("_tiny.yaml", f"model: {{name: tiny-llama, hf_dir: {copy}}}\ntarget: x86_64\nscheme: fp32\n")
    before = keys(tiny_project, monkeypatch)
    cfg = copy / "generation_config.json"
    cfg.write_text(cfg.read_text().replace("{", '{\n  "temperature": 0.5,', 1))
    assert keys(tiny_project, monkeypatch)["model"] != before["model"]


def test_moving_a_source_changes_no_key(tiny_project, monkeypatch, tiny_model_dir, tmp_path):
    import shutil

    before = keys(tiny_project, monkeypatch)
    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny_model_dir, moved)
    tiny_project.write("_tiny.yaml", f"model: {{name: tiny-llama, hf_dir: {moved}}}\ntarget: x86_64\nscheme: fp32\n")
    assert keys(tiny_project, monkeypatch) == before


def test_tool_upgrade_rekeys_stages_using_it(tiny_project, monkeypatch):
    before = keys(tiny_project, monkeypatch)
    real = tools.fingerprint.__wrapped__

    monkeypatch.setattr(tools, "fingerprint", lambda t: "99.0" if t == "transformers" else real(t))
    after = keys(tiny_project, monkeypatch)
    assert after["model"] != before["model"]  # model lists transformers
    assert after["bundle"] != before["bundle"]  # provisional: the model's action key stands in for its output


def test_stage_version_bump_rekeys(tiny_project, monkeypatch):
    before = keys(tiny_project, monkeypatch)
    bundle = stage_class("bundle")
    monkeypatch.setattr(bundle, "version", bundle.version + 1)
    after = keys(tiny_project, monkeypatch)
    assert after["model"] == before["model"] and after["bundle"] != before["bundle"]


def test_template_edit_rekeys_bundle(tiny_project, monkeypatch, tmp_path):
    from pipeline.generic import bundle

    before = keys(tiny_project, monkeypatch)
    tpl = tmp_path / "README.md.j2"
    tpl.write_text("changed {{ recipe }}\n")
    monkeypatch.setattr(bundle.Bundle, "sources", classmethod(lambda cls, r, v="": {"readme_template": tpl}))
    after = keys(tiny_project, monkeypatch)
    assert after["model"] == before["model"] and after["bundle"] != before["bundle"]


def test_source_date_epoch_env_enters_bundle_key(tiny_project, monkeypatch):
    before = keys(tiny_project, monkeypatch)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1234")
    assert keys(tiny_project, monkeypatch)["bundle"] != before["bundle"]


def test_store_location_is_not_in_keys(tiny_project, monkeypatch, tmp_path):
    before = keys(tiny_project, monkeypatch)
    monkeypatch.setenv("KILN_STORE", str(tmp_path / "other-store"))
    assert {s.stage: s.key for s in plan(load_recipe("tiny"))} == before


def material(params: dict, inputs: dict) -> dict:
    return {"stage": "s", "version": 1, "params": params, "inputs": inputs, "sources": {}, "tools": {"torch": "2.13"},
            "code": {"pipeline.generic.model": "blake3:00"}}


def test_key_material_order_does_not_matter():
    a = material({"a": 1, "b": [1, 2]}, {"x": "k"})
    b = material({"b": [1, 2], "a": 1}, {"x": "k"})
    assert compute_key(a) == compute_key(b)
    assert compute_key(a) != compute_key(material({"a": 1, "b": [2, 1]}, {"x": "k"}))


def test_diff_names_changed_fields():
    old = material({"dtype": "float32"}, {"model": "aa"})
    new = material({"dtype": "bfloat16"}, {"model": "bb"})
    assert diff(old, new) == ['inputs.model: "aa" → "bb"', 'params.dtype: "float32" → "bfloat16"']


def test_stat_cache_hashes_once_until_file_changes(tmp_path, monkeypatch):
    from pipeline.engine import hashing

    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 1000)
    calls = []
    real = hashing.hash_file_bytes
    monkeypatch.setattr(hashing, "hash_file_bytes", lambda p: calls.append(p) or real(p))
    cache = StatCache(tmp_path / "cache.json")
    h1 = cache.file_hash(f)
    cache.save()
    assert StatCache(tmp_path / "cache.json").file_hash(f) == h1 and len(calls) == 1
    f.write_bytes(b"y" * 1000)
    os.utime(f, ns=(1, 1))
    assert StatCache(tmp_path / "cache.json").file_hash(f) != h1 and len(calls) == 2


def test_hf_cache_blob_names_are_used_as_hashes(tmp_path):
    blob_sha = "a" * 64
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / blob_sha).write_bytes(b"weights")
    snap = tmp_path / "snapshots" / "c0ffee"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(f"../../blobs/{blob_sha}")
    assert StatCache(tmp_path / "c.json").file_hash(snap / "model.safetensors") == "sha256:" + blob_sha


PLAN_KEYS = "import json, sys; from pipeline.engine.plan import plan; from pipeline.registry import load_recipe; " \
            "print(json.dumps({s.stage: s.key for s in plan(load_recipe(sys.argv[1]))}))"


@pytest.mark.parametrize("name", ["smollm2_135m_mnn", "llama32_1b_sm8750", "smollm2_135m_rk3568"])
def test_planning_is_deterministic_across_processes(name):
    """Keys must not depend on hash randomization, set/dict order or anything else of one process."""
    runs = [subprocess.run([sys.executable, "-c", PLAN_KEYS, name], capture_output=True, text=True, check=True, cwd=ROOT,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    first, second = (json.loads(r) for r in runs)
    assert first == second and len(first) > 3


def test_a_stages_code_is_its_module_and_the_kiln_modules_it_imports(tmp_path):
    """Function-level imports count (stages import their helpers inside `run`); `if TYPE_CHECKING:`
    imports and engine plumbing do not."""
    from pipeline.engine.code import code_hashes

    code = code_hashes("pipeline.qnn.quantize", StatCache(tmp_path / "c.json"))
    assert {"pipeline.qnn.quantize", "pipeline.qnn.common", "pipeline.qnn.quant.flow", "pipeline.qnn.quant.qdq",
            "pipeline.qnn.adapted_llama", "pipeline.qnn.quant"} <= set(code)  # quant/__init__ runs too
    assert not {m for m in code if m.startswith(("pipeline.engine.stage", "pipeline.engine.errors", "pipeline.recipe"))}
    assert all(h.startswith("blake3:") for h in code.values())
    assert "pipeline.engine.tarball" in code_hashes("pipeline.generic.bundle", StatCache(tmp_path / "c.json"))


def test_import_parsing_resolves_relative_and_from_imports():
    from pipeline.engine.code import imported_modules

    source = ("from __future__ import annotations\nfrom typing import TYPE_CHECKING\nimport json\n"
              "from pipeline.qnn import genie\nfrom . import common\nfrom .quant import flow\n"
              "if TYPE_CHECKING:\n    from pipeline.qnn import qairt\nelse:\n    import pipeline.qnn.ort_qnn\n"
              "def run():\n    from pipeline.qnn.quant.qdq import build_qdq\n")
    assert imported_modules(source, "pipeline.qnn.example", False) == [
        "pipeline.qnn.common", "pipeline.qnn.genie", "pipeline.qnn.ort_qnn", "pipeline.qnn.quant",
        "pipeline.qnn.quant.flow", "pipeline.qnn.quant.qdq"]
