"""`python -m pipeline perf` with a board's `llama-bench -o json` output: the prompt and generation
tests of one model become one row of the device page, and the `eval.latency` lines to paste are
printed; files that are not llama-bench output are refused with what is wrong. The sample is a
real llama-bench run (the aarch64 build under qemu, SmolLM2-135M Q8_0, -p 8 -n 4 -t 1: emulated
speeds, used here for the format only)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import ROOT
from pipeline.engine.errors import KilnError
from pipeline.llamacpp.bench_json import gguf_type, read

SAMPLE = Path(__file__).parent / "data" / "llama_bench_qemu_q8_0.json"


def test_prompt_and_generation_tests_become_one_row():
    rows = json.loads(SAMPLE.read_text())
    [q] = read(SAMPLE)["queries"]
    assert q["type"] == "Q8_0" and q["prompt_tokens"] == 8 and q["generated_tokens"] == 4
    assert q["prompt_tokens_per_s"] == rows[0]["avg_ts"] and q["generated_tokens_per_s"] == rows[1]["avg_ts"]
    assert gguf_type("llama 8B Q2_K - Medium") == "Q2_K" and gguf_type("llama 1B F16") == "F16"


def test_perf_files_the_run_and_prints_the_latency_lines(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env["KILN_ARTIFACTS"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-m", "pipeline", "perf", "smollm2_135m_rk3568", str(SAMPLE), "--label", "board1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    speed = json.loads(SAMPLE.read_text())[1]["avg_ts"]
    assert f"tokens_per_s: {{Q8_0: {speed:.3g}}}" in done.stdout
    assert 'source: "board1: llama-bench on Intel(R) Xeon(R) Processor"' in done.stdout
    assert json.loads((tmp_path / "smollm2_135m_rk3568" / "device" / "board1.json").read_text())["kind"] == "llama-bench"


@pytest.mark.parametrize(("content", "problem"), [
    ([{"model_type": "llama 8B Q2_K"}], "not `llama-bench -o json` output"),
    (["a", "b"], "not `llama-bench -o json` output"),
    ("only-prompt", "needs a prompt test"),
])
def test_files_that_are_not_llama_bench_output_are_refused(tmp_path, content, problem):
    rows = json.loads(SAMPLE.read_text())
    data = [rows[0]] if content == "only-prompt" else content
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    with pytest.raises(KilnError, match=problem):
        read(path)
    path.write_text("[" + " " * (2 << 20) + "]")
    with pytest.raises(KilnError, match="over 1048576 bytes"):
        read(path)
