"""Recipe loading: extends, references, and errors that name file, line and field."""
from __future__ import annotations

import re

import pytest

from pipeline.engine.errors import RecipeError
from pipeline.engine.settings import Settings
from pipeline.recipe.load import available
from pipeline.registry import load_recipe


def load(project, monkeypatch, name="r"):
    return load_recipe(name, project.settings(monkeypatch))


def error_of(project, monkeypatch, name="r") -> str:
    with pytest.raises(RecipeError) as e:
        load(project, monkeypatch, name)
    return str(e.value)


BASE = """\
model:
  name: m
  gguf: /nonexistent/m.gguf
target: x86_64
scheme: fp32
"""


def test_every_shipped_recipe_validates_and_plans():
    from pipeline.engine.plan import plan

    settings = Settings.from_env()
    names = available(settings.recipes_dir)
    for required in ("llama32_1b_sm8750", "llama31_8b_rk3568_q2k", "llama31_8b_rk3568_q8_0", "qwen2_0_5b_mnn"):
        assert required in names
    for name in names:
        specs = plan(load_recipe(name, settings))
        stages = [s.stage for s in specs]
        assert "model" in stages and "bundle" in stages
        assert stages.index("model") < stages.index("bundle")


def test_missing_model_plans_and_says_how_to_provide_it():
    from pipeline.engine.plan import plan

    specs = {s.stage: s for s in plan(load_recipe("llama32_1b_sm8750", Settings.from_env()))}
    blocked = specs["model"].blocked
    assert "meta-llama/Llama-3.2-1B-Instruct" in blocked and "hf download" in blocked and "model.hf_dir" in blocked
    for node in ("qnn.export@ar128", "qnn.export@ar1", "qnn.quantize", "bundle"):  # everything built from the weights
        assert specs[node].blocked == blocked
    assert specs["text"].blocked is None  # the text does not need the weights


def test_target_values_come_from_target_file():
    r = load_recipe("llama32_1b_sm8750", Settings.from_env())
    assert (r.target.soc.soc_model, r.target.soc.dsp_arch, r.spec.context_length) == (69, "v79", 4096)
    assert r.scheme.weights.bits == 4 and r.scheme.kv_cache.bits == 8 and r.spec.ar_lengths == [128, 1]


def test_bad_enum_names_file_line_field(project, monkeypatch):
    project.write("r.yaml", BASE.replace("scheme: fp32\n", "scheme:\n  use: fp32\n  weights:\n    bits: 7\n"))
    msg = error_of(project, monkeypatch)
    assert "r.yaml:8: scheme.weights.bits: expected one of 2, 3, 4, 5, 6, 8, 16, 32, got 7" in msg


def test_unknown_key_suggests_close_name(project, monkeypatch):
    project.write("r.yaml", BASE + "context_lenght: 512\n")
    msg = error_of(project, monkeypatch)
    assert "r.yaml:6: context_lenght: unknown key (did you mean 'context_length'?)" in msg


def test_unknown_nested_stage_key(project, monkeypatch):
    project.write("r.yaml", BASE + "stages:\n  bundle:\n    compres_level: 3\n")
    msg = error_of(project, monkeypatch)
    assert "r.yaml:8: stages.bundle.compres_level: unknown key (did you mean 'compress_level'?)" in msg


def test_unknown_target_suggests_and_lists(project, monkeypatch):
    project.write("r.yaml", BASE.replace("target: x86_64", "target: sm8570"))
    msg = error_of(project, monkeypatch)
    assert "r.yaml:4: target: unknown target 'sm8570' (did you mean" in msg and "'sm8750'" in msg
    assert "known: aarch64," in msg


def test_unknown_scheme_in_use_mapping(project, monkeypatch):
    project.write("r.yaml", BASE.replace("scheme: fp32", "scheme:\n  use: w4a61_kv8"))
    msg = error_of(project, monkeypatch)
    assert "r.yaml:6: scheme.use: unknown scheme 'w4a61_kv8' (did you mean 'w4a16_kv8'" in msg


def test_error_in_scheme_file_points_into_that_file(project, monkeypatch):
    project.write("schemes/broken.yaml", "description: x\nweights:\n  bits: 4\n  granularity: per-block\n")
    project.write("r.yaml", BASE.replace("scheme: fp32", "scheme: broken"))
    msg = error_of(project, monkeypatch)
    assert "schemes/broken.yaml:2: scheme.weights: block_size is required" in msg


def test_missing_required_field(project, monkeypatch):
    project.write("r.yaml", "target: x86_64\nscheme: fp32\n")
    assert "r.yaml:1: model: required, missing" in error_of(project, monkeypatch)


def test_model_needs_exactly_one_source(project, monkeypatch):
    project.write("r.yaml", BASE.replace("  gguf: /nonexistent/m.gguf\n", "  gguf: a.gguf\n  hf_dir: d\n"))
    expected = "r.yaml:1: model: give exactly one of embedded, hf_dir, hub_id, gguf, synthetic (got hf_dir, gguf)"
    assert expected in error_of(project, monkeypatch)


def test_yaml_syntax_error_has_line(project, monkeypatch):
    project.write("r.yaml", BASE + "stages: [unclosed\n")
    shown = project.settings(monkeypatch).shown(project.recipes / "r.yaml")
    assert error_of(project, monkeypatch).startswith(f"{shown}:7: invalid YAML: expected ',' or ']'")


def test_duplicate_key_is_an_error(project, monkeypatch):
    project.write("r.yaml", BASE + "context_length: 512\ncontext_length: 1024\n")
    assert "r.yaml:7: context_length: duplicate key (first at line 6)" in error_of(project, monkeypatch)


def test_extends_cycle(project, monkeypatch):
    project.write("a.yaml", "extends: b\n")
    project.write("b.yaml", "extends: a\n")
    msg = error_of(project, monkeypatch, "a")
    assert "extends: cycle:" in msg and "a.yaml -> " in msg and "b.yaml -> " in msg


def test_extends_unknown_base(project, monkeypatch):
    project.write("r.yaml", "extends: _bsae\n")
    project.write("_base.yaml", BASE)
    assert "r.yaml:1: extends: no such file '_bsae' (did you mean '_base'?)" in error_of(project, monkeypatch)


def test_unknown_recipe_lists_existing(project, monkeypatch):
    project.write("alpha.yaml", BASE)
    project.write("_hidden_base.yaml", BASE)
    msg = error_of(project, monkeypatch, "alpah")
    assert "unknown recipe 'alpah' (did you mean 'alpha'?)" in msg and "recipes in" in msg
    assert "_hidden_base" not in msg


def test_extends_deep_merges_and_child_wins(project, monkeypatch):
    project.write("_base.yaml", BASE + "stages:\n  bundle: {compress_level: 9, source_date_epoch: 5}\n")
    project.write("r.yaml", "extends: _base\nstages:\n  bundle: {compress_level: 2}\n")
    r = load(project, monkeypatch)
    assert r.stage_params("bundle") == {"compress_level": 2, "source_date_epoch": 5}
    assert r.where("stages", "bundle", "compress_level").endswith("r.yaml:3")
    assert r.where("stages", "bundle", "source_date_epoch").endswith("_base.yaml:7")


def test_inline_scheme_override_merges_with_named_scheme(project, monkeypatch):
    project.write("r.yaml", BASE.replace("scheme: fp32", "scheme: {use: w4a16_kv8, kv_cache: {bits: 16}}"))
    r = load(project, monkeypatch)
    assert r.scheme.name == "w4a16_kv8" and r.scheme.kv_cache.bits == 16 and r.scheme.weights.block_size == 64


@pytest.mark.parametrize("name", ["gen4", "8-Elite", "8gen4", "v79", "Snapdragon 8 Elite", "SM8750"])
def test_a_target_answers_to_the_names_people_use(project, monkeypatch, name):
    from pipeline.engine.plan import plan

    project.write("r.yaml", BASE.replace("target: x86_64", f"target: {name!r}").replace("scheme: fp32", "scheme: w8a16_kv8"))
    project.write("canonical.yaml", BASE.replace("target: x86_64", "target: sm8750").replace("scheme: fp32", "scheme: w8a16_kv8"))
    r = load(project, monkeypatch)
    assert r.target.name == "sm8750" and r.target.soc.soc_model == 69
    assert r.notes == (f"target {name} → sm8750",)
    canonical = load(project, monkeypatch, "canonical")
    assert r.spec.model_dump() == canonical.spec.model_dump()  # what keys are made of: an alias changes none
    assert [s.stage for s in plan(r)] == [s.stage for s in plan(canonical)]


def test_an_alias_that_fits_several_targets_is_refused_with_the_candidates(project, monkeypatch):
    project.write("r.yaml", BASE.replace("target: x86_64", "target: rockchip"))
    assert error_of(project, monkeypatch) == \
        "r.yaml:4: target: 'rockchip' fits several targets: rk3568, rk3588; name one of them".replace(
            "r.yaml", project.settings(monkeypatch).shown(project.recipes / "r.yaml"))


def test_an_inline_target_override_may_use_an_alias(project, monkeypatch):
    project.write("r.yaml", BASE.replace("target: x86_64", "target: {use: gen3, description: my phone}"))
    r = load(project, monkeypatch)
    assert (r.target.name, r.target.description, r.notes) == ("sm8650", "my phone", ("target gen3 → sm8650",))


def test_doit_and_list_say_which_target_an_alias_named(project, monkeypatch):
    import subprocess
    import sys

    from pipeline import ROOT

    project.write("r.yaml", BASE.replace("target: x86_64", "target: gen4").replace("scheme: fp32", "scheme: w8a16_kv8"))
    out = subprocess.run([sys.executable, "-m", "doit", "-f", "dodo.py", "list", "recipe=r"], env=project.env(),
                         capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.count("kiln: target gen4 → sm8750") == 1, out.stdout + out.stderr
    listing = subprocess.run([sys.executable, "-m", "pipeline", "list"], env=project.env(), capture_output=True,
                             text=True, cwd=ROOT, check=True).stdout
    assert any(line.split()[:2] == ["r", "sm8750"] for line in listing.splitlines())
    line = next(line for line in listing.splitlines() if line.strip().startswith("sm8750 "))
    assert "8-elite" in line and "gen4" in line and "v79" in line
    assert "rockchip*" in next(line for line in listing.splitlines() if line.strip().startswith("rk3568 "))


def test_a_malformed_alias_is_refused_with_its_line(project, monkeypatch):
    (project.recipes / "targets" / "board.yaml").write_text(
        "description: a board\naliases: [ok-name, \"x; touch /tmp/pwned\"]\nruntime: llama.cpp\ncpu: {arch: aarch64}\n")
    project.write("r.yaml", BASE.replace("target: x86_64", "target: board"))
    msg = error_of(project, monkeypatch)
    assert re.search(r"targets/board\.yaml:2: target\.aliases\[1\]: String should match pattern .*, "
                     r"got .x; touch /tmp/pwned.$", msg), msg
