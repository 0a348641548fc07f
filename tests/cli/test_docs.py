"""The docs: a short README that opens with the two commands, a generated reference that is
current, no citation of files outside the repository, and an 'adding a stage' example that runs."""
from __future__ import annotations

import json
import re
import subprocess
import sys

from pipeline import ROOT
from pipeline.cli.docs import reference
from pipeline.registry import all_stages, backend

README = ROOT / "README.md"


def test_reference_is_current():
    assert (ROOT / "docs" / "reference.md").read_text() == reference(), \
        "run: .venv/bin/python -m pipeline docs --write docs/reference.md"


def test_reference_documents_every_stage_under_its_backend_and_every_field():
    text = reference()
    for cls in all_stages():
        section = text[:text.index("## Recipe")]
        assert f"| `{cls.name}` | `pipeline/{backend(cls.name)}/" in section
        assert f"`stages.{cls.name}`" in text
        for field, info in cls.Params.model_fields.items():
            assert f"`stages.{cls.name}.{info.alias or field}`" in text
    for key in ("model.embedded", "model.hub_id", "context_length", "ar_lengths", "soc.soc_model", "weights.block_size",
                "aliases"):
        assert f"`{key}`" in text


def test_docs_cli_lists_stages_by_backend():
    out = subprocess.run([sys.executable, "-m", "pipeline", "docs"], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    headings = re.findall(r"^### (.+)$", out, re.M)
    assert headings[:5] == ["Backend-neutral", "Qualcomm (QNN/QAIRT + Genie)", "llama.cpp", "MNN",
                            "Hand-written int8 runtimes (KuiperLLama's format)"]
    assert out.index("`qnn.compile`") < out.index("### llama.cpp") < out.index("`llamacpp.build`") < out.index("### MNN")


def test_readme_is_short_and_opens_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= 150
    block = lines[lines.index("```bash") + 1: lines.index("```")]
    assert [line.split("#")[0].strip() for line in block] == [
        "bash setup.sh && .venv/bin/doit", "bash setup.sh && .venv/bin/python -m pytest"]
    assert "bash setup.sh && .venv/bin/python -m pytest" in (ROOT / ".ci" / "run").read_text()


def test_docs_links_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists (and an anchor, a heading)."""
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+\.md|[^)#\s]+/)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_nothing_cites_files_outside_the_repository():
    pattern = re.compile(r"FACTS\.md|\.\./shared|\bseed 00\d", re.I)
    tracked = subprocess.run(["git", "ls-files", "pipeline", "templates", "recipes", "docs", "README.md", "tests",
                              "bench", "pyproject.toml", "setup.sh"], capture_output=True, text=True, cwd=ROOT,
                             check=True).stdout.split()
    hits = [f for f in tracked if (ROOT / f).is_file() and f != "tests/cli/test_docs.py"
            and pattern.search((ROOT / f).read_text(errors="replace"))]
    assert hits == []


def test_the_adding_a_stage_example_plans_builds_and_rekeys(tiny_project, monkeypatch):
    """docs/examples/weight_stats.py, handed to the loader beside the registered stages, is a
    working stage: its section validates, it plans after `model`, builds, and its params key it."""
    from docs.examples.weight_stats import WeightStats
    from pipeline.engine.plan import plan
    from pipeline.engine.runner import build
    from pipeline.recipe.load import load_recipe

    tiny_project.write("ex.yaml", "extends: tiny\nstages:\n  example.weight_stats: {top: 2}\n")
    settings = tiny_project.settings(monkeypatch)
    planned = plan(load_recipe("ex", settings, (*all_stages(), WeightStats)))
    specs = {s.stage: s for s in planned}
    assert specs["example.weight_stats"].pending == "model"  # its input's output is not built yet
    for stage in ("model", "example.weight_stats"):
        build(specs[stage], planned, settings)
    specs = {s.stage: s for s in plan(load_recipe("ex", settings, (*all_stages(), WeightStats)))}
    assert specs["example.weight_stats"].inputs == {"model": specs["model"].output}
    largest = json.loads((specs["example.weight_stats"].workspace / "weights.json").read_text())["largest"]
    assert [(r["name"], r["shape"]) for r in largest] == [("model.embed_tokens.weight", [128, 64]),
                                                          ("model.layers.0.mlp.down_proj.weight", [64, 128])]
    tiny_project.write("ex.yaml", "extends: tiny\nstages:\n  example.weight_stats: {top: 3}\n")
    again = {s.stage: s.key for s in plan(load_recipe("ex", settings, (*all_stages(), WeightStats)))}
    assert again["model"] == specs["model"].key and again["example.weight_stats"] != specs["example.weight_stats"].key


def test_files_the_docs_name_exist():
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    named = {p for page in pages for p in re.findall(
        r"(?:pipeline|tests|bench|templates|recipes)/[\w./-]*\w", page.read_text()) if "<" not in p}
    assert named and sorted(p for p in named if not (ROOT / p).exists()) == []
