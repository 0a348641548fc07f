"""`python -m pipeline compare`: two built recipes sharing a model land in one table (with the
float reference) and one plot, ranked by perplexity; an unbuilt recipe or one without evaluation
is refused with what to do."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from pipeline import ROOT


def compare(project, *names: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "compare", *names], cwd=ROOT, env=project.env(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_recipes_on_one_model_share_one_ranked_table_and_plot(tiny_project):
    kuiper = "extends: tiny\ntarget: kuiper\ncontext_length: 128\nscheme: {use: kuiper_int8_g64%s}\n"
    tiny_project.write("k64.yaml", kuiper % "")
    tiny_project.write("k32.yaml", kuiper % ", weights: {bits: 8, granularity: per-block, block_size: 32}")
    unbuilt = compare(tiny_project, "k64", "k32")
    assert unbuilt.returncode == 2 and "recipe 'k64' is not built" in unbuilt.stderr and "doit recipe=k64" in unbuilt.stderr
    tiny_project.doit("recipe=k64")
    tiny_project.doit("recipe=k32")
    done = compare(tiny_project, "k64", "k32")
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = [line.split(" | ")[0].strip("| ") for line in rows]
    assert sorted(names) == ["float32 HF", "int8 · k32", "int8 · k64"]  # one group: the same reference
    ppl = [float(line.split(" | ")[3]) for line in rows]
    assert ppl == sorted(ppl)
    page = (tiny_project.artifacts / "compare" / "index.html").read_text()
    assert page.count("<table>") == 1 and 'src="quality-1.svg"' in page and "<script" not in page
    svg = (tiny_project.artifacts / "compare" / "quality-1.svg").read_bytes()
    assert svg.startswith(b"<?xml") and b"k32" in svg
    compare(tiny_project, "k64", "k32")
    assert (tiny_project.artifacts / "compare" / "quality-1.svg").read_bytes() == svg  # same figures, same bytes

    # each recipe's own page: its table, its plot and its stage graph; build details beside it, not shipped
    report = tiny_project.artifacts / "k64" / "report"
    page = (report / "index.html").read_text()
    assert page.count("<table>") == 2 and 'src="quality.svg"' in page and 'src="graph.svg"' in page
    assert "kuiper.perplexity" in (report / "graph.svg").read_text()  # the stage graph names its stages
    build = (report / "build.html").read_text()
    assert "kuiper.export" in build and "action key" in build
    shipped = tiny_project.artifacts / "k64" / "bundle" / "to_device" / "report"
    assert (shipped / "index.html").read_bytes() == (report / "index.html").read_bytes()
    assert not (shipped / "build.html").exists()

    none = compare(tiny_project, "tiny")
    assert none.returncode == 2 and re.search(r"recipe 'tiny' has no perplexity evaluation", none.stderr)
