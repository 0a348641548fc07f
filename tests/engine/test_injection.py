"""Recipe text never becomes code: every run.sh and the CMake toolchain, rendered with hostile
values in every recipe field that reaches them, then run (bash with stand-ins for adb, the phone's
shell, qemu and python3; `cmake -P` for the toolchain). No marker file may appear, and — the
positive control — the hostile strings must reach the stand-ins intact (a script that died early
would prove nothing)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.engine.templating import render
from pipeline.registry import load_recipe, stage_class

# A shell and CMake word-breaker with command substitutions that would each drop a marker file.
H = "x'\"$(touch M1)`touch M2`;touch M3 ${HOME} \\ #"
H_TEXT = H + "\ntouch M4\n"  # where several lines are allowed (prompts, questions)
H_DIR = "d'\"$(touch M5);touch M6"  # a folder given to run.sh at run time

STANDIN = r'''#!/usr/bin/env python3
"""Stand-in for {name}: records its argv; `adb shell` runs the joined command like the phone's shell."""
import json, os, subprocess, sys
with open(os.environ["STANDIN_LOG"], "a") as log:
    log.write(json.dumps({{"tool": "{name}", "argv": sys.argv[1:], "cwd": os.getcwd()}}) + "\n")
if "{name}" == "adb" and sys.argv[1:2] == ["shell"]:
    sys.exit(subprocess.run(["sh", "-c", " ".join(sys.argv[2:])], cwd=os.environ["PHONE"]).returncode)
'''


@pytest.fixture
def box(tmp_path: Path) -> dict[str, Path]:
    """Folders for one run: the bundle, the phone's working folder, stand-ins first on PATH."""
    paths = {name: tmp_path / name for name in ("bundle", "phone", "bin")}
    for p in paths.values():
        p.mkdir()
    for tool in ("adb", "qemu-aarch64-static", "python3"):
        (paths["bin"] / tool).write_text(STANDIN.format(name=tool).replace("#!/usr/bin/env python3", f"#!{sys.executable}"))
        (paths["bin"] / tool).chmod(0o755)
    paths["log"] = tmp_path / "standins.jsonl"
    return paths


def run_script(box: dict[str, Path], script: str, *args: str) -> list[dict]:
    run_sh = box["bundle"] / "run.sh"
    run_sh.write_text(script)
    run_sh.chmod(0o755)
    env = {**os.environ, "PATH": f"{box['bin']}:{os.environ['PATH']}", "STANDIN_LOG": str(box["log"]),
           "PHONE": str(box["phone"]), "HOME": str(box["phone"])}
    subprocess.run(["bash", str(run_sh), *args], cwd=box["bundle"], env=env, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in box["log"].read_text().splitlines()] if box["log"].exists() else []
    box["log"].unlink(missing_ok=True)
    return calls


def markers(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("M[0-9]"))


def hostile_recipe(project, monkeypatch, target: str, scheme: str, stages: dict) -> object:
    (project.recipes / "r.yaml").write_text(json.dumps({
        "description": H, "model": {"name": "m.x-1", "embedded": "smollm2-135m-instruct"},
        "target": {"use": target, "description": H}, "scheme": {"use": scheme, "description": H},
        "context_length": 2048, "stages": stages}))
    return load_recipe("r", project.settings(monkeypatch))


def test_mnn_run_sh(project, monkeypatch, box, tmp_path):
    r = hostile_recipe(project, monkeypatch, "mnn_arm", "mnn_int4_b64", {"mnn.verify": {"chat": H_TEXT}})
    p = stage_class("mnn.package").params(r, "")
    values = dict(p, recipe="r", mnn_version="3.6.1", llmexport_version="0.0.5", answer=H_TEXT, label=H,
                  report_md=H_TEXT)
    script = render("mnn/run.sh.j2", **values)
    assert H in render("mnn/README.md.j2", **values)  # prose in a README, shown as written
    config = json.loads(render("mnn/config.json.j2", files={"llm_model": H, "llm_weight": "w", "tokenizer_file": "t"},
                               **stage_class("mnn.config").Params().model_dump(mode="json")))
    assert config["llm_model"] == H  # JSON through tojson: any string stays one value
    calls = run_script(box, script, "host")
    assert [c["argv"] for c in calls if c["tool"] == "python3"] == [["-", H_TEXT]]  # the question, intact
    calls = run_script(box, script, "push", H_DIR)
    assert (box["phone"] / H_DIR).is_dir()  # the phone's shell got exactly the folder's name
    assert any(c["argv"][-1] == H_DIR + "/" for c in calls if c["argv"][:1] == ["push"])
    demo = box["phone"] / H_DIR / "llm_demo"
    demo.write_text(f"#!/bin/sh\necho \"$PWD\" > {tmp_path}/demo_ran\n")
    demo.chmod(0o755)
    run_script(box, script, "chat", H_DIR)
    assert Path(tmp_path / "demo_ran").read_text().strip() == str(box["phone"] / H_DIR)
    assert markers(tmp_path) == []


def test_genie_run_sh(project, monkeypatch, box, tmp_path):
    device = tmp_path / "phone" / "data"
    r = hostile_recipe(project, monkeypatch, "sm8750", "w4a16_kv8",
                       {"qnn.package": {"prompt": H_TEXT, "device_dir": str(device)}})
    p = stage_class("qnn.package").params(r, "")
    for name in p["libraries"]:
        (box["bundle"] / name).write_text("stand-in library")
    values = dict(p, recipe="r", prompts={1024: True, 4096: False}, missing=list(p["libraries"]),
                  binaries=[{"file": "models/model.bin", "bytes": 1, "provider": "ort-qnn", "soc_model": 69,
                             "htp_arch": 79, "qnn_build": H, "graphs": {}}])
    script = render("genie/run.sh.j2", **values)
    assert H in render("genie/README.md.j2", **values)
    (device / "models").mkdir(parents=True)
    (device / "genie-t2t-run").write_text(f"#!/bin/sh\necho \"$PWD $*\" >> {tmp_path}/genie_ran\n")
    (device / "genie-t2t-run").chmod(0o755)
    calls = run_script(box, script, "all")
    assert [c["argv"][:2] for c in calls if c["argv"][:1] == ["push"]][0] == ["push", "models/model.bin"]
    ran = (tmp_path / "genie_ran").read_text().splitlines()
    assert ran[0] == f"{device} -c ./htp-model-config-m.x-1.json --prompt_file prompt.txt"
    assert len(ran) == 2 and "--profile perf_1024.json" in ran[1]
    assert markers(tmp_path) == []


def test_llamacpp_run_sh(project, monkeypatch, box, tmp_path):
    r = hostile_recipe(project, monkeypatch, "rk3568", "gguf_q8_0", {"llamacpp.verify": {"prompt": H_TEXT}})
    p = stage_class("llamacpp.package").params(r, "")
    values = dict(p, recipe="r", expected=H_TEXT, report_md=H_TEXT, label=H)
    script = render("llamacpp/run.sh.j2", **values)
    assert H in render("llamacpp/README.md.j2", **values)
    calls = run_script(box, script)
    qemu = [c["argv"] for c in calls if c["tool"] == "qemu-aarch64-static"]
    assert len(qemu) == 1 and qemu[0][:3] == ["-cpu", "cortex-a76", "./bin/llama-completion"]
    assert qemu[0][qemu[0].index("-p") + 1] == H_TEXT  # the prompt, intact
    assert qemu[0][qemu[0].index("-c") + 1] == str(r.spec.context_length)  # never the training context
    calls = run_script(box, script, "models/" + H_DIR, H)
    qemu = [c["argv"] for c in calls if c["tool"] == "qemu-aarch64-static"][0]
    assert qemu[qemu.index("-m") + 1] == "models/" + H_DIR and qemu[qemu.index("-p") + 1] == H
    assert markers(tmp_path) == []


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is installed by setup.sh")
def test_cmake_toolchain(project, monkeypatch, tmp_path):
    r = hostile_recipe(project, monkeypatch, "rk3568", "gguf_q8_0", {})
    p = stage_class("llamacpp.build").params(r, "rk3568")
    emulator = str(tmp_path / 'qemu "$(touch M1)" ${CMAKE_COMMAND} $<1:x>;file(TOUCH M2)')
    toolchain = tmp_path / "toolchain.cmake"
    toolchain.write_text(render("llamacpp/toolchain.cmake.j2", triple=p["triple"], arch=p["arch"], core=p["core"],
                                emulator=emulator)
                         + 'message(STATUS "emulator=${CMAKE_CROSSCOMPILING_EMULATOR}")\n'
                         + 'message(STATUS "cc=${CMAKE_C_COMPILER} cpu=${CMAKE_SYSTEM_PROCESSOR} '
                           'root=${CMAKE_FIND_ROOT_PATH}")\n')
    out = subprocess.run(["cmake", "-P", str(toolchain)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"emulator={emulator.replace(';', chr(92) + ';')};-cpu;max" in out.stdout + out.stderr
    assert "cc=aarch64-linux-gnu-gcc cpu=aarch64 root=/usr/aarch64-linux-gnu" in out.stdout + out.stderr
    assert markers(tmp_path) == []


@pytest.mark.parametrize("field, value", [
    ("description", "a\nrm -rf ~"), ("target.description", "a\n"), ("target.cpu.qemu_cpu", "max -L /"),
    ("target.cpu.core", "a)\nexecute_process(COMMAND touch M)"), ("target.cpu.march", "armv8 -o x"),
    ("stages.qnn.package.device_dir", "/data/'x'"), ("stages.qnn.package.device_dir", "relative"),
    ("stages.llamacpp.build.cmake_args", ["-DX=1 -DY=2"]), ("stages.llamacpp.build.host_tools", ["a b"]),
    ("stages.llamacpp.build.unity_targets", ["llama-common;ggml"]), ("stages.llamacpp.build.unity_skip", ["../x.cpp"]),
    ("stages.llamacpp.build.unity_skip", ["/abs.cpp"]), ("stages.llamacpp.build.unity_batch", 1),
    ("stages.mnn.config.tmp_path", "/tmp/$(x)"), ("model.hub_id", "org/name; x"), ("model.revision", "-rf"),
])
def test_values_of_the_wrong_shape_are_refused(project, monkeypatch, field, value):
    from pipeline.engine.errors import RecipeError

    doc: dict = {"model": {"name": "m", "embedded": "smollm2-135m-instruct"}, "target": {"use": "rk3568"},
                 "scheme": "gguf_q8_0"}
    if field.startswith("model.hub_id") or field.startswith("model.revision"):
        doc["model"] = {"name": "m", "hub_id": "org/name"}
    node = doc
    parts = field.split(".")
    if parts[0] == "stages":
        node = doc.setdefault("stages", {}).setdefault(".".join(parts[1:3]), {})
        parts = parts[3:]
    for part in parts[:-1]:
        node = node.setdefault(part, {}) if part != "target" else node["target"]
    node[parts[-1]] = value
    (project.recipes / "r.yaml").write_text(json.dumps(doc))
    with pytest.raises(RecipeError, match=r"r\.yaml:1: .*(should match pattern|Input should be)"):
        load_recipe("r", project.settings(monkeypatch))


def test_comment_values_stay_on_one_line():
    from pipeline.engine.templating import environment

    assert environment().from_string("# {{ v | oneline }}").render(v="a\nrm -rf ~\r\x07b") == "# a rm -rf ~  b"
