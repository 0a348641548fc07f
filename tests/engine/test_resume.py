"""ctx.resume through the runner: it survives a failed run of the key, the rerun of the same key
sees it, and publishing the output removes it."""
from __future__ import annotations

import pytest

from pipeline.engine.plan import StageSpec
from pipeline.engine.runner import StageFailed, run_and_publish
from pipeline.engine.store import Store


def test_resume_state_survives_a_failure_and_goes_once_the_output_is_published(project, monkeypatch):
    settings = project.settings(monkeypatch)
    store = Store(project.store)
    key = "ab" * 32
    spec = StageSpec(stage="resume_probe", name="resume_probe", entry="tests.engine.resume_probe:ResumeProbe",
                     variant="", recipe="probe", static={"params": {}, "tools": {}}, input_nodes=(), source_paths={},
                     resource="light", memory=0, store=project.store, workspace=project.artifacts / "probe" / "resume_probe",
                     key=key, inputs={})
    with pytest.raises(StageFailed, match="failing after its first checkpoint"):
        run_and_publish(spec, store, settings)
    assert (store.resume_dir(key) / "progress.txt").read_text() == "layer 1 of 2\n"
    assert store.output_of(key) is None and not list((project.store / "scratch").iterdir())

    digest = run_and_publish(spec, store, settings)
    assert (store.out(digest) / "result.txt").read_text() == "resumed after layer 1 of 2\n"
    assert store.output_of(key) == digest and not store.resume_dir(key).exists()
