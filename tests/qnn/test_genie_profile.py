"""Genie's perf.json (Qualcomm's example, verbatim) read into the recipe's device report."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli.perf import ingest
from pipeline.engine.errors import KilnError
from pipeline.qnn import genie_profile

SEED = Path(__file__).parent / "data" / "genie_perf_example.json"


def test_seed_profile_reads_to_the_figures_the_seed_quotes():
    got = genie_profile.read(SEED)
    assert got["init_ms"] == pytest.approx(1124.713)
    (q,) = got["queries"]
    assert (q["prompt_tokens"], q["generated_tokens"]) == (823, 200)
    assert q["prompt_tokens_per_s"] == pytest.approx(1547.99, abs=0.01)
    assert q["generated_tokens_per_s"] == pytest.approx(38.53, abs=0.01)
    assert q["time_to_first_token_ms"] == pytest.approx(531.665)
    assert q["generation_ms"] == pytest.approx(5191.579)


def edited(tmp_path: Path, change) -> Path:
    doc = json.loads(SEED.read_text())
    change(doc)
    path = tmp_path / "perf.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("change,message", [
    (lambda d: d["components"][0]["events"][1].pop("token-generation-rate"),
     "dialog0: a GenieDialog_query lacks token-generation-rate"),
    (lambda d: d["header"].update(artifact_type="QNN_PROFILE"), "header.artifact_type: Input should be 'GENIE_PROFILE'"),
    (lambda d: d["components"][0]["events"].pop(1), "no GenieDialog_query event"),
    (lambda d: d["components"][0]["events"][1]["time-to-first-token"].update(unit="fortnights"), "unknown time unit"),
])
def test_broken_profiles_are_refused_by_name(tmp_path, change, message):
    with pytest.raises(KilnError, match=message):
        genie_profile.read(edited(tmp_path, change))


def test_unknown_fields_from_newer_genie_are_tolerated(tmp_path):
    path = edited(tmp_path, lambda d: d["components"][0]["events"][1].update({"kv-cache-bytes": {"value": 1, "unit": ""}}))
    assert genie_profile.read(path)["queries"][0]["prompt_tokens"] == 823


def test_ingest_files_runs_beside_the_build_and_tabulates_them(tmp_path):
    out = ingest("r", SEED, "phone-a", tmp_path)
    ingest("r", SEED, "phone-b", tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["device.md", "phone-a.json", "phone-b.json"]
    table = (out / "device.md").read_text()
    assert "| phone-a | 823 | 1548.0 | 531.7 | 200 | 38.53 | 1125 |" in table and "| phone-b |" in table
    with pytest.raises(KilnError, match="--label '../x'"):
        ingest("r", SEED, "../x", tmp_path)


def test_perf_verb_exits_nonzero_on_a_non_profile(tmp_path):
    bad = tmp_path / "perf.json"
    bad.write_text('{"header": {}, \n oops')
    proc = subprocess.run([sys.executable, "-m", "pipeline", "perf", "smollm2_135m_sm8750", str(bad)],
                          capture_output=True, text=True, env={"KILN_ARTIFACTS": str(tmp_path), "PATH": ""})
    assert proc.returncode == 2 and f"{bad}:2: not JSON" in proc.stderr
