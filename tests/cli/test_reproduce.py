"""`reproduce`: every stage rebuilt in an empty store, compared file by file with the stored entry."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from pipeline.engine.store import Store
from tests.checkout import copy_checkout


def reproduce(project, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "reproduce", *args], env=project.env(),
                          capture_output=True, text=True, cwd=project.root)


@pytest.mark.slow
def test_a_deterministic_recipe_reproduces_and_the_store_is_left_as_it_was(tiny_project):
    tiny_project.doit("recipe=tiny")
    store = Store(tiny_project.store)
    before = (sorted(store.outputs()), sorted(store.actions()))
    proc = reproduce(tiny_project, "tiny")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reproduce tiny: 2 of 2 stages identical" in proc.stdout
    assert (sorted(store.outputs()), sorted(store.actions())) == before
    assert not list((tiny_project.store / "scratch").iterdir())
    via_doit = tiny_project.doit("reproduce", "recipe=tiny", "--stages", "bundle").stdout
    assert "reproduce tiny: 1 of 1 stages identical" in via_doit


def test_no_output_names_an_action_key(tiny_project):
    """Outputs are addressed by content; an action key written into one (a uuid from it, a manifest
    listing keys) would make every rebuild a new output and stop early cutoff."""
    tiny_project.doit("recipe=tiny")
    store = Store(tiny_project.store)
    keys = [k.encode() for k in store.actions()] + [k[:16].encode() for k in store.actions()]
    files = [f for d in store.outputs() for f in store.out(d).rglob("*") if f.is_file()]
    assert len(files) > 5 and len(keys) == 4
    assert [f.name for f in files if any(k in f.read_bytes() for k in keys)] == []


@pytest.mark.slow
def test_a_timestamp_in_an_output_is_found_with_its_file_and_offset(tiny_project, tmp_path):
    tiny_project.root = copy_checkout(tmp_path / "checkout")
    source = tiny_project.root / "pipeline" / "generic" / "model.py"
    text = source.read_text()
    assert text.count('"architecture": ') == 1
    source.write_text(text.replace('"architecture": ', '"built_at": __import__("time").time(), "architecture": '))
    tiny_project.doit("recipe=tiny")
    proc = reproduce(tiny_project, "tiny")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "reproduce tiny: 1 of 2 stages identical" in proc.stdout
    assert re.search(r"  model: summary\.json: differs at byte \d+ \(hint: a timestamp\?", proc.stdout), proc.stdout
    assert "  bundle: identical" in proc.stdout  # rebuilt from the stored model output: its own bytes are stable


def test_unknown_or_unbuilt_stages_are_clear_errors(tiny_project):
    proc = reproduce(tiny_project, "tiny")
    assert proc.returncode == 2 and "model, bundle not built in the store; run `doit recipe=tiny` first" in proc.stderr
    tiny_project.doit("recipe=tiny")
    proc = reproduce(tiny_project, "tiny", "--stages", "model,nope")
    assert proc.returncode == 2 and "nope not in recipe tiny (its stages: model, bundle)" in proc.stderr


def test_hints_name_the_usual_causes(tmp_path):
    from pipeline.cli.reproduce import compare

    a, b = tmp_path / "a", tmp_path / "b"
    samples = {"compile.json": ('{"seconds": {"graph": 35.3}}', '{"seconds": {"graph": 19.9}}', "a timing?"),
               "export.json": ('{"uuid": "1b4e28ba-2fa1-11d2-883f-0016d3cca427"}',
                               '{"uuid": "6fa459ea-ee8a-3ca4-894e-db77e160355e"}', "a random id?"),
               "w.bin": ("\x00\x01\x02\x03", "\x00\x01\x02\x04", "float order?")}
    for root in (a, b):
        root.mkdir()
    for name, (old, new, _) in samples.items():
        (a / name).write_text(old)
        (b / name).write_text(new)
    (a / "same.txt").write_text("x")
    (b / "same.txt").write_text("x")
    lines = compare(a, b)
    assert len(lines) == 3
    for line, (name, (old, new, why)) in zip(lines, sorted(samples.items())):
        offset = next(i for i, (x, y) in enumerate(zip(old, new)) if x != y)
        assert line.startswith(f"{name}: differs at byte {offset} (hint: {why}"), line
