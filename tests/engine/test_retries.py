"""A stage that declares `retries` is run again when a known-flaky tool failed it (ToolFlaked), that
many times at most; any other failure is final (the QAIRT test in tests/qnn/test_qnn_compile.py
sees its tools run once). Run on a copy of the checkout whose bundle stage fails while a marker
file is missing (it creates the marker, so the second run succeeds)."""
from __future__ import annotations

import re

from tests.checkout import copy_checkout

FLAKY = '''    def run(self, ctx: StageContext) -> None:
        import os
        mark = os.environ.get("TEST_FLAKY_MARK", "")
        if mark and not os.path.exists(mark):
            if not os.environ.get("TEST_FLAKY_ALWAYS"):
                open(mark, "w").close()
            from pipeline.engine.errors import ToolFlaked
            raise ToolFlaked("the flaky tool failed")
'''


def flaky_checkout(tmp_path, retries: int):
    root = copy_checkout(tmp_path / "checkout")
    bundle = root / "pipeline" / "generic" / "bundle.py"
    text = bundle.read_text()
    text = text.replace("    name = \"bundle\"\n", f"    name = \"bundle\"\n    retries = {retries}\n", 1)
    text = text.replace("    def run(self, ctx: StageContext) -> None:\n", FLAKY, 1)
    bundle.write_text(text)
    return root


def test_a_stage_that_fails_once_is_run_again_and_succeeds(tiny_project, tmp_path):
    tiny_project.root = flaky_checkout(tmp_path, retries=1)
    mark = tmp_path / "failed-once"
    out = tiny_project.doit("recipe=tiny", TEST_FLAKY_MARK=str(mark)).stdout
    assert mark.exists()
    assert re.search(r"kiln: tiny:bundle: failed on attempt 1 of 2 \(tiny:bundle failed \(exit 75\).*\); trying again", out)
    assert "kiln: tiny:bundle: built" in out and "kiln: bundle ready" in out


def test_retries_are_bounded(tiny_project, tmp_path):
    tiny_project.root = flaky_checkout(tmp_path, retries=1)
    proc = tiny_project.doit("recipe=tiny", check=False, TEST_FLAKY_MARK=str(tmp_path / "never"),
                             TEST_FLAKY_ALWAYS="1")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert out.count("the flaky tool failed") >= 2 and "failed on attempt 1 of 2" in out
    assert "failed on attempt 2 of 2" not in out  # the last failure is the build's error, not a retry
