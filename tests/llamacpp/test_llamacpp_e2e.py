"""smollm2_135m_rk3568 for real (slow): llama.cpp cross-build, GGUF variants, qemu runs, PPL.

Uses the repository's store (KILN_STORE / artifacts/.store) so the llama.cpp
builds happen once per machine or CI run (ccache lives in that store too);
the workspace is a temporary directory. The recipe built here is the shipped one
less `llama-cli` and `llama-perplexity` in the static build: llama-cli drags in the server
target (+4 min cold on 2 cores), and CI must stay under 25 minutes; llama-completion and
llama-bench go through the same build and checks (perplexity runs on the host build).
For the same reason it scores 2 windows of 512 tokens instead of 8 (each window is ~10 s of CPU
per variant here), calibrates the imatrix on 8 chunks and benches 8 + 4 tokens under qemu.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from conftest import new_project

from pipeline import ROOT
from pipeline.engine.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group(__name__)]  # one worker builds the module fixture
SHIPPED = "smollm2_135m_rk3568"
RECIPE = "rk_ci"
DEVICE_TOOLS = ["llama-completion", "llama-bench"]
# 2 perplexity windows; 3 problems of the demo set at budgets of 16 and 32 tokens; the board's speed ratio
EVAL = (f"eval:\n  perplexity: {{windows: 2}}\n  tasks: {{problems: {ROOT / 'recipes/tasks/kiln_arithmetic_demo.jsonl'}, "
        "label: Kiln arithmetic demo (not GSM8K), limit: 3, budgets: [16, 32]}\n"
        "  latency: {source: 'RK3568, Llama-3.1-8B, llama-cli 128 tokens: Q2_K 18.18 s, Q8_0 49.73 s', "
        "relative_speed: {Q2_K: 2.73, Q8_0: 1.0}}\n")


def holds_store_path(project, data: bytes) -> bool:
    """Whether `data` names the store (as linked into the project or resolved)."""
    return any(str(root).encode() in data for root in (project.store, project.store.resolve()))


@pytest.fixture(scope="module")
def rk(tmp_path_factory):
    project = new_project(tmp_path_factory.mktemp("rk") / "proj")
    for f in (f"{SHIPPED}.yaml", "_smollm2_135m.yaml"):
        shutil.copy(ROOT / "recipes" / f, project.recipes)
    project.write(f"{RECIPE}.yaml", f"extends: {SHIPPED}\n{EVAL}stages:\n"
                  f"  llamacpp.build: {{device_tools: {DEVICE_TOOLS}}}\n  llamacpp.imatrix: {{chunks: 8}}\n"
                  "  llamacpp.verify: {bench_prompt: 8, bench_gen: 4}\n")
    store = Settings.from_env().store_dir()
    store.mkdir(parents=True, exist_ok=True)
    project.store.symlink_to(store)
    proc = project.doit(f"recipe={RECIPE}", timeout=3600)  # cold: two llama.cpp builds, ~15 min on 2 cores
    return project, proc.stdout


def test_bundle_holds_static_aarch64_binaries(rk):
    project, out = rk
    assert "kiln: bundle ready:" in out
    to_device = project.artifacts / RECIPE / "bundle" / "to_device"
    for tool in DEVICE_TOOLS:
        desc = subprocess.run(["file", "-L", str(to_device / "bin" / tool)], capture_output=True, text=True).stdout
        assert "ARM aarch64" in desc and "statically linked" in desc, desc
    models = sorted(p.name for p in (to_device / "models").iterdir())
    assert models == ["SmolLM2-135M-Instruct-Q2_K.gguf", "SmolLM2-135M-Instruct-Q4_K_M.gguf",
                      "SmolLM2-135M-Instruct-Q8_0.gguf"]
    manifest = json.loads((to_device / "manifest.json").read_text())
    assert "run.sh" in manifest["files"] and "bin/llama-completion" in manifest["files"]
    # the store sits inside this checkout: its commit must not be compiled into ggml (bytes would
    # then depend on where the store is); ggml_commit() reads "unknown"
    head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    binary = (to_device / "bin" / "llama-completion").read_bytes()
    assert len(head) == 7 and b"\0" + head.encode() + b"\0" not in binary  # as a C string
    # nor the store's path (__FILE__ of sources compiled by absolute path: kiln_build.cmake maps it)
    assert not holds_store_path(project, binary)


def test_run_sh_under_qemu_prints_coherent_text(rk):
    project, _ = rk
    to_device = project.artifacts / RECIPE / "bundle" / "to_device"
    done = subprocess.run(["sh", str(to_device / "run.sh")], capture_output=True, text=True, timeout=900,
                          env={"PATH": "/usr/bin:/bin", "THREADS": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout.strip()
    assert text.startswith("I believe the meaning of life is")
    words = re.findall(r"[A-Za-z']+", text[len("I believe the meaning of life is"):])
    assert len(words) >= 12  # 32 tokens of real words, not an empty or garbage continuation
    expected = (to_device / "README.md").read_text()
    assert text.splitlines()[0] in expected  # the README's expected output is what the board prints


def test_report_has_ppl_for_float_and_every_quant_type(rk):
    project, _ = rk
    report = json.loads((project.artifacts / RECIPE / "llamacpp.report" / "report.json").read_text())
    ppl = {r["type"]: r["ppl"] for r in report["perplexity"]}
    assert set(ppl) == {"F16", "Q4_K_M", "Q2_K", "Q8_0"}
    assert all(1 < v < 1000 for v in ppl.values())
    assert abs(ppl["Q8_0"] / ppl["F16"] - 1) < 0.02  # 8-bit is near lossless
    # the shared protocol: llama.cpp scored the float reference's token ids; the F16 GGUF is the float model
    rows = {r["type"]: r for r in report["perplexity"]}
    assert abs(ppl["F16"] / report["float"]["ppl"] - 1) < 1e-3 and rows["F16"]["kld"] < 1e-3
    assert rows["Q2_K"]["kld"] > rows["Q4_K_M"]["kld"] > rows["Q8_0"]["kld"]
    assert all(r["tokens_scored"] == 2 * 255 for r in rows.values())
    assert ppl["Q2_K"] > ppl["Q4_K_M"]  # 2-bit is worse than 4-bit
    assert all(r["label"].startswith("emulated") for r in report["verify"])


def test_switching_quant_type_reruns_no_build(rk):
    project, _ = rk
    project.write("switched.yaml", f"extends: {RECIPE}\nscheme: {{use: gguf_q8_0}}\n")
    explain = project.doit("explain", "recipe=switched").stdout
    for node in ("llamacpp.build@host", "llamacpp.build@rk3568", "llamacpp.convert", "llamacpp.source"):
        assert re.search(rf"switched:{re.escape(node)} \[\w+…\]: store hit", explain), explain
    out = project.doit("recipe=switched").stdout
    assert not re.search(r"llamacpp\.build@\S+: built", out)


def test_store_entries_are_untouched_by_the_build(rk, monkeypatch):
    """Bundling links files from the store; nothing may write through those links."""
    from pipeline.cli.verify import verify
    from pipeline.engine.plan import plan
    from pipeline.registry import load_recipe

    project, _ = rk
    specs = plan(load_recipe(RECIPE, project.settings(monkeypatch)))
    outputs = {s.output for s in specs}
    assert None not in outputs and len(specs) == 24
    checked, bad = verify(project.store.resolve(), only=outputs)
    assert checked == len(outputs) and bad == []


def test_tasks_run_every_prompt_at_every_budget_and_the_report_draws_them(rk):
    project, _ = rk
    for gguf_type in ("Q4_K_M", "Q2_K", "Q8_0"):
        out = project.artifacts / RECIPE / f"llamacpp.tasks@{gguf_type}"
        tasks = json.loads((out / "tasks.json").read_text())
        assert tasks["problems"] == 3 and set(tasks["accuracy"]) == {"step_by_step", "answer_and_verify", "budget_aware"}
        for rows in tasks["accuracy"].values():
            assert set(rows) == {"16", "32"} and all(r["n"] == 3 and 0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
                                                     for r in rows.values())
        answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
        assert len(answers) == 3 * 3 * 2 and all(a["tokens"] <= a["budget"] for a in answers)
        cut = {(a["problem"], a["budget"]): a["text"] for a in answers if a["prompt"] == "step_by_step"}
        assert all(cut[(i, 32)].strip().startswith(cut[(i, 16)].strip()[:20]) for i in range(3))  # one generation, cut at 16
    report = project.artifacts / RECIPE / "report"
    page = (report / "index.html").read_text()
    figures = json.loads((report / "evaluation.json").read_text())["figures"]
    assert {"tasks-budget_aware.svg", "latency-step_by_step.svg", "graph.svg"} <= set(figures)
    assert all(f'src="{f}"' in page for f in figures) and "No device speed stated for Q4_K_M" in page


def test_imatrix_option_quantizes_with_calibration_text(rk):
    project, _ = rk
    project.write("imat.yaml", f"extends: {RECIPE}\nscheme: {{use: gguf_q4_k_m, gguf_types: [Q4_K_M], gguf_imatrix: true}}\n")
    out = project.doit("recipe=imat", "imat:llamacpp.perplexity@Q4_K_M").stdout  # up to the PPL, not the bundle
    # built here, or found in the shared store from an earlier run
    assert re.search(r"imat:llamacpp\.imatrix: (built|hit|reused) ", out)
    assert re.search(r"imat:llamacpp\.quantize@Q4_K_M: (built|hit|reused) ", out)
    imatrix = project.artifacts / "imat" / "llamacpp.imatrix" / "imatrix.gguf"
    assert imatrix.stat().st_size > 10_000
    # the calibration file is named without the store's path, in the imatrix and the GGUF it quantized
    quantized = next((project.artifacts / "imat" / "llamacpp.quantize@Q4_K_M").glob("*.gguf")).read_bytes()
    for data in (imatrix.read_bytes(), quantized):
        assert b"calibration.txt" in data and not holds_store_path(project, data)
    with_imatrix = json.loads((project.artifacts / "imat" / "llamacpp.perplexity@Q4_K_M" / "perplexity.json").read_text())
    without = json.loads((project.artifacts / RECIPE / "llamacpp.perplexity@Q4_K_M" / "perplexity.json").read_text())
    # calibration (Genesis) is disjoint from evaluation (Exodus); the imatrix must not hurt
    assert with_imatrix["ppl"] <= without["ppl"] * 1.01
