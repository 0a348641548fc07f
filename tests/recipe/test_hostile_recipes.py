"""Recipes as a hostile user writes them: bounded reading, strict types, safe names, no traceback,
and inheritance that does what the user means. Every error is `file:line: field: ...`, exit 2."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from pipeline import ROOT
from pipeline.engine.errors import RecipeError
from pipeline.registry import load_recipe

BASE = "extends: _smollm2_135m\ntarget: sm8750\nscheme: w8a16_kv8\n"
ALIAS_BOMB = ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n"  # 63 aliases (within the budget), 9**8 values
              + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefg", "bcdefgh", strict=True))
              + "model: {name: m, embedded: smollm2-135m-instruct}\n")


@pytest.fixture
def hostile(project):
    (project.recipes / "_smollm2_135m.yaml").write_text((ROOT / "recipes" / "_smollm2_135m.yaml").read_text())
    (project.recipes / "smollm2_135m_sm8750.yaml").write_text((ROOT / "recipes" / "smollm2_135m_sm8750.yaml").read_text())
    return project


def error(project, monkeypatch, text: str | bytes, name: str = "r") -> str:
    path = project.recipes / f"{name}.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(RecipeError) as e:
        load_recipe(name, project.settings(monkeypatch))
    shown = project.settings(monkeypatch).shown(path)
    return str(e.value).replace(shown, "r.yaml")


def test_an_alias_bomb_is_refused_at_once_within_memory(hostile, monkeypatch):
    assert len(ALIAS_BOMB) < 2048  # 43 million values once expanded
    t0 = time.monotonic()
    assert error(hostile, monkeypatch, ALIAS_BOMB) == "r.yaml:1: more than 20000 values once its aliases are expanded"
    assert time.monotonic() - t0 < 2


@pytest.mark.parametrize("text, message", [
    ("a: " + "[" * 60 + "]" * 60 + "\n", "r.yaml:1: nested deeper than 24 levels"),
    ("".join(f"k{i}: &x{i} 1\n" for i in range(70)) + "v: [" + ", ".join(f"*x{i}" for i in range(70)) + "]\n",
     "r.yaml:71: more than 64 YAML aliases; a recipe is plain data (share settings with `extends:`)"),
    (b"model: {name: caf\xe9}\n", "r.yaml:1: not UTF-8 (byte 0xe9 at offset 17)"),
    ("a: 1\n\x07b: 2\n", "r.yaml:2: invalid YAML: special characters are not allowed (character U+0007)"),
    ("? [a, b]\n: c\n", "r.yaml:1: invalid YAML: found unhashable key"),
    ("1: 2\n", "r.yaml:1: (top level): keys are names, not '1'"),
    ("a: !!python/object/apply:os.system [touch /tmp/x]\n", "r.yaml:1: invalid YAML: could not determine a constructor"),
    ("extends: null\n", "r.yaml:1: extends: a recipe name or a list of them, got None"),
    ("extends: {a: b}\n", "r.yaml:1: extends: a recipe name or a list of them, got {'a': 'b'}"),
    ("extends: ../../etc/passwd\n", "r.yaml:1: extends: no such file '../../etc/passwd'"),
    (BASE + "context_length: \"2048\"\n", "r.yaml:4: context_length: Input should be a valid integer, got '2048'"),
    (BASE + "context_length: true\n", "r.yaml:4: context_length: Input should be a valid integer, got True"),
    (BASE + "ar_lengths: [0]\n", "r.yaml:4: ar_lengths[0]: Input should be greater than or equal to 1, got 0"),
    (BASE + "stages: {bundle: {compress_level: 1.0}}\n",
     "r.yaml:4: stages.bundle.compress_level: Input should be a valid integer"),
    (BASE + "stages: {qnn.verify: {prompts: [\"a\", 3]}}\n",
     "r.yaml:4: stages.qnn.verify.prompts[1]: Input should be a valid string"),
    (BASE + "store: /etc\n", "r.yaml:4: store: unknown key"),
    (BASE.replace("_smollm2_135m", "_smollm2_135m\nmodel: {name: ../../x}"), "r.yaml:2: model.name: String should match pattern"),
    (BASE + "text: {calibration: {kjv: 'Gen1:1; rm -rf /'}}\n", "r.yaml:4: text.calibration.kjv: String should match pattern"),
    (BASE.replace("scheme: w8a16_kv8", "scheme: {use: w8a16_kv8, overrides: [{match: '('}]}"),
     "r.yaml:3: scheme.overrides[0].match: not a regular expression"),
    (BASE.replace("target: sm8750", "target: ../targets/sm8750"), "r.yaml:2: target: unknown target '../targets/sm8750'"),
])
def test_malformed_recipes_are_file_line_errors(hostile, monkeypatch, text, message):
    assert error(hostile, monkeypatch, text).startswith(message)


def test_a_huge_recipe_file_is_refused_before_it_is_parsed(hostile, monkeypatch):
    text = BASE + "# " + "x" * 300_000 + "\n"
    assert error(hostile, monkeypatch, text) == f"r.yaml:1: {len(text)} bytes; a recipe file may hold at most 262144"


def test_recipe_names_cannot_walk_out_of_recipes(hostile, monkeypatch, tmp_path):
    outside = tmp_path / "outside.yaml"
    outside.write_text(BASE)
    (hostile.recipes / "link.yaml").symlink_to(outside)
    settings = hostile.settings(monkeypatch)
    for name in ("../outside", "/tmp/x", "a b", ".hidden", "x" * 65):
        with pytest.raises(RecipeError, match=r"recipe name .*: letters, digits"):
            load_recipe(name, settings)
    with pytest.raises(RecipeError, match=r"link\.yaml resolves to .*outside\.yaml, outside "):
        load_recipe("link", settings)


def test_doit_reports_a_bad_recipe_without_a_traceback(hostile):
    (hostile.recipes / "r.yaml").write_text(ALIAS_BOMB)
    for recipe in ("r", "../r", "missing"):
        proc = subprocess.run([sys.executable, "-m", "doit", "-f", "dodo.py", "list", f"recipe={recipe}"], cwd=ROOT,
                              env=hostile.env(), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
        assert re.match(r"kiln: error: ", proc.stderr), proc.stderr


def test_a_child_recipe_changes_one_field_of_its_parents_scheme_and_target(hostile, monkeypatch):
    r = load_recipe_text(hostile, monkeypatch, "extends: smollm2_135m_sm8750\nscheme: {weights: {bits: 8}}\n"
                                               "target: {description: my phone}\n")
    assert (r.scheme.name, r.scheme.weights.bits, r.scheme.weights.block_size) == ("w4a16_kv8", 8, 64)
    assert (r.target.name, r.target.description, r.target.soc.soc_model) == ("sm8750", "my phone", 69)


def test_an_unknown_name_says_which_file_gave_it(hostile, monkeypatch):
    (hostile.recipes / "_parent.yaml").write_text(BASE.replace("scheme: w8a16_kv8", "scheme: w9a16"))
    msg = error(hostile, monkeypatch, "extends: _parent\nscheme: {weights: {bits: 8}}\n")
    shown = hostile.settings(monkeypatch).shown(hostile.recipes / "_parent.yaml")
    assert msg.startswith(f"{shown}:3: scheme.use: unknown scheme 'w9a16'")


def load_recipe_text(project, monkeypatch, text: str):
    (project.recipes / "r.yaml").write_text(text)
    return load_recipe("r", project.settings(monkeypatch))


def test_nothing_a_recipe_says_makes_kiln_write_outside_workspace_and_store(hostile, monkeypatch, tmp_path):
    """The places Kiln writes come from the settings (environment, pyproject), never a recipe."""
    from pipeline.engine.plan import plan

    r = load_recipe_text(hostile, monkeypatch, BASE)
    settings = hostile.settings(monkeypatch)
    for spec in plan(r):
        assert spec.store == settings.store_dir() and spec.workspace.is_relative_to(settings.artifacts / "r")
