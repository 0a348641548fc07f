"""The README's recipe reference is generated from the schemas and kept in sync."""
from __future__ import annotations

from pipeline import ROOT
from pipeline.cli.docs import embed, reference
from pipeline.registry import all_stages


def test_readme_reference_is_current():
    readme = (ROOT / "README.md").read_text()
    assert embed(readme) == readme, "run: .venv/bin/python -m pipeline docs --write README.md"


def test_reference_documents_every_stage_and_field():
    text = reference()
    for cls in all_stages():
        assert f"`stages.{cls.name}`" in text
        for field, info in cls.Params.model_fields.items():
            assert f"`stages.{cls.name}.{info.alias or field}`" in text
    for key in ("model.embedded", "model.hub_id", "context_length", "ar_lengths", "soc.soc_model", "weights.block_size"):
        assert f"`{key}`" in text


def test_readme_opens_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1: lines.index("```")]
    assert [line.split("#")[0].strip() for line in block] == [
        "bash setup.sh && .venv/bin/doit", "bash setup.sh && .venv/bin/python -m pytest"]
    assert "bash setup.sh && .venv/bin/python -m pytest" in (ROOT / ".ci" / "run").read_text()
