"""llama.cpp path: planning, keys, toolchain rendering, errors — no builds here."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from pipeline.engine import tools
from pipeline.engine.errors import KilnError
from pipeline.engine.plan import plan
from pipeline.engine.templating import render
from pipeline.generic.text import overlap
from pipeline.llamacpp.build import KILN_CMAKE
from pipeline.llamacpp.elf import describe
from pipeline.registry import load_recipe

RK = """\
model: {name: m, gguf: /nonexistent.gguf}
target: rk3568
scheme: {use: gguf_q4_k_m, gguf_types: [Q4_K_M]}
"""


def keys(project, monkeypatch, name="r") -> dict[str, str]:
    return {s.stage: s.key for s in plan(load_recipe(name, project.settings(monkeypatch)))}


def fake_tree(path):
    path.mkdir()
    (path / "CMakeLists.txt").write_text("project(llama.cpp)\n")
    (path / "convert_hf_to_gguf.py").write_text("# converter\n")
    return path


def test_rk3568_recipe_plans_the_whole_graph():
    specs = {s.stage: s for s in plan(load_recipe("smollm2_135m_rk3568"))}
    for node in ("llamacpp.source", "llamacpp.convert", "llamacpp.build@host", "llamacpp.build@rk3568",
                 "llamacpp.quantize@Q4_K_M", "llamacpp.quantize@Q2_K", "llamacpp.quantize@Q8_0", "llamacpp.verify@Q2_K",
                 "llamacpp.perplexity@float", "llamacpp.perplexity@Q8_0", "llamacpp.report", "llamacpp.package", "bundle",
                 "reference", "report"):
        assert node in specs, node
    assert specs["llamacpp.build@rk3568"].material["params"]["cmake_args"][:1] == ["-DCMAKE_BUILD_TYPE=Release"]
    flags = specs["llamacpp.build@rk3568"].material["params"]["cmake_args"]
    assert "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16" in flags and "-DCMAKE_EXE_LINKER_FLAGS=-static" in flags
    assert "-DBUILD_SHARED_LIBS=OFF" in flags and "-DGGML_NATIVE=OFF" in flags and "-DLLAMA_CURL=OFF" in flags
    assert set(specs["bundle"].inputs) == {"llamacpp.build@rk3568", "llamacpp.quantize@Q4_K_M", "llamacpp.quantize@Q2_K",
                                           "llamacpp.quantize@Q8_0", "llamacpp.report", "report", "llamacpp.package"}
    assert "model" not in specs["bundle"].inputs  # the HF checkpoint does not go to the board


def test_seed_8b_recipes_plan_and_stop_at_model():
    for name, qtype in (("llama31_8b_rk3568_q2k", "Q2_K"), ("llama31_8b_rk3568_q8_0", "Q8_0")):
        specs = {s.stage: s for s in plan(load_recipe(name))}
        assert f"llamacpp.quantize@{qtype}" in specs
        assert "meta-llama/Llama-3.1-8B-Instruct" in specs["model"].blocked
        assert specs["llamacpp.build@rk3568"].blocked is None  # builds do not need the weights


def test_toolchain_template_renders_cross_settings():
    text = render("llamacpp/toolchain.cmake.j2", triple="aarch64-linux-gnu", arch="aarch64", core="cortex-a55",
                  emulator="/usr/bin/qemu-aarch64-static")
    assert "set(CMAKE_SYSTEM_NAME Linux)" in text and 'set(CMAKE_SYSTEM_PROCESSOR "aarch64")' in text
    assert 'set(CMAKE_C_COMPILER "aarch64-linux-gnu-gcc")' in text
    assert 'set(CMAKE_CXX_COMPILER "aarch64-linux-gnu-g++")' in text
    assert 'set(CMAKE_FIND_ROOT_PATH "/usr/aarch64-linux-gnu")' in text
    assert 'set(CMAKE_CROSSCOMPILING_EMULATOR "/usr/bin/qemu-aarch64-static" -cpu max)' in text
    without = render("llamacpp/toolchain.cmake.j2", triple="aarch64-linux-gnu", arch="aarch64", core="x",
                     emulator=None)
    assert "CROSSCOMPILING_EMULATOR" not in without


def test_toolchain_template_missing_value_is_an_error():
    from jinja2 import UndefinedError

    with pytest.raises(UndefinedError):
        render("llamacpp/toolchain.cmake.j2", triple="aarch64-linux-gnu")


def test_source_tree_change_rekeys_builds_not_model(project, monkeypatch, tmp_path):
    tree = fake_tree(tmp_path / "llama.cpp")
    project.write("r.yaml", RK + f"stages:\n  llamacpp.source: {{tree: {tree}}}\n")
    before = keys(project, monkeypatch)
    (tree / "ggml.c").write_text("int x;\n")
    after = keys(project, monkeypatch)
    for node in ("llamacpp.source", "llamacpp.build@host", "llamacpp.build@rk3568", "llamacpp.convert", "bundle"):
        assert after[node] != before[node], node
    assert after["model"] == before["model"] and after["text"] == before["text"]


def test_git_commit_of_the_tree_enters_the_key(project, monkeypatch, tmp_path):
    tree = fake_tree(tmp_path / "llama.cpp")
    (tree / ".git" / "refs" / "heads").mkdir(parents=True)
    (tree / ".git" / "HEAD").write_text("ref: refs/heads/master\n")
    (tree / ".git" / "refs" / "heads" / "master").write_text("a" * 40 + "\n")
    project.write("r.yaml", RK + f"stages:\n  llamacpp.source: {{tree: {tree}}}\n")
    spec = {s.stage: s for s in plan(load_recipe("r", project.settings(monkeypatch)))}["llamacpp.source"]
    assert spec.material["params"]["commit"] == "a" * 40
    before = spec.key
    (tree / ".git" / "refs" / "heads" / "master").write_text("b" * 40 + "\n")
    assert keys(project, monkeypatch)["llamacpp.source"] != before


def test_compiler_flag_change_rekeys_the_cross_build_only(project, monkeypatch):
    project.write("r.yaml", RK)
    before = keys(project, monkeypatch)
    project.write("r.yaml", RK.replace("target: rk3568", "target: {use: rk3568, cpu: {arch: aarch64, march: armv8-a}}"))
    after = keys(project, monkeypatch)
    assert after["llamacpp.build@rk3568"] != before["llamacpp.build@rk3568"]
    assert after["llamacpp.verify@Q4_K_M"] != before["llamacpp.verify@Q4_K_M"]
    for node in ("llamacpp.build@host", "llamacpp.convert", "llamacpp.quantize@Q4_K_M", "llamacpp.perplexity@Q4_K_M"):
        assert after[node] == before[node], node


def test_compiler_version_enters_the_key(project, monkeypatch):
    project.write("r.yaml", RK)
    before = keys(project, monkeypatch)
    real = tools.fingerprint.__wrapped__
    monkeypatch.setattr(tools, "fingerprint", lambda t: "gcc 99" if t == "exe:aarch64-linux-gnu-gcc" else real(t))
    after = keys(project, monkeypatch)
    assert after["llamacpp.build@rk3568"] != before["llamacpp.build@rk3568"]
    assert after["llamacpp.build@host"] == before["llamacpp.build@host"]


def test_unity_build_options_enter_both_builds_and_can_be_turned_off(project, monkeypatch):
    project.write("r.yaml", RK)
    specs = {s.stage: s for s in plan(load_recipe("r", project.settings(monkeypatch)))}
    for node in ("llamacpp.build@host", "llamacpp.build@rk3568"):
        assert specs[node].material["params"]["unity_args"] == [
            "-DKILN_UNITY_TARGETS=llama-common", "-DKILN_UNITY_BATCH=8", "-DKILN_UNITY_SKIP=json.cpp"]
        assert "kiln_cmake" in specs[node].material["sources"]
    project.write("r.yaml", RK + "stages:\n  llamacpp.build: {unity_targets: []}\n")
    off = {s.stage: s for s in plan(load_recipe("r", project.settings(monkeypatch)))}
    for node in ("llamacpp.build@host", "llamacpp.build@rk3568"):
        assert off[node].material["params"]["unity_args"][0] == "-DKILN_UNITY_TARGETS="
        assert off[node].key != specs[node].key
    assert off["llamacpp.convert"].key == specs["llamacpp.convert"].key


UNITY_PROJECT = {
    "CMakeLists.txt": "cmake_minimum_required(VERSION 3.19)\nproject(t CXX)\nadd_subdirectory(lib)\n"
                      "add_executable(app main.cpp)\ntarget_link_libraries(app lib)\n",
    "lib/CMakeLists.txt": "add_library(lib STATIC a.cpp b.cpp c.cpp)\n",
    "lib/a.cpp": "static int twice(int x) { return 2 * x; }\nint a() { return twice(1); }\n"
                 "const char *where() { return __FILE__; }\n",
    "lib/b.cpp": "int b() { return 3; }\n",
    "lib/c.cpp": "static int twice(int x) { return x + x; }\nint c() { return twice(2); }\n",  # clashes with a.cpp
    "main.cpp": "#include <cstdio>\nint a(); int b(); int c(); const char *where();\n"
                "int main() { std::printf(\"%d %s %s\\n\", a() + b() + c(), where(), __FILE__); }\n",
}


def configure_unity_project(tmp_path, targets: str, skip: str):
    tree = tmp_path / "tree"
    for name, text in UNITY_PROJECT.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)
    build = tmp_path / "build"
    return build, subprocess.run(
        ["cmake", "-S", tree, "-B", build, f"-DCMAKE_PROJECT_INCLUDE={KILN_CMAKE}", f"-DKILN_UNITY_TARGETS={targets}",
         "-DKILN_UNITY_BATCH=8", f"-DKILN_UNITY_SKIP={skip}"], capture_output=True, text=True, timeout=120)


def test_kiln_cmake_batches_a_target_skips_listed_files_and_keeps_file_names_relative(tmp_path):
    """kiln_build.cmake on a three-file library: a.cpp and c.cpp define the same static function, so
    the build only links when c.cpp is compiled alone; __FILE__, in a batch (included by absolute
    path) or not (CMake passes absolute paths), is relative to the tree."""
    build, done = configure_unity_project(tmp_path, "lib", "c.cpp")
    assert done.returncode == 0, done.stderr
    batches = list((build / "lib" / "CMakeFiles" / "lib.dir" / "Unity").glob("unity_*_cxx.cxx"))
    assert len(batches) == 1
    text = batches[0].read_text()
    assert "a.cpp" in text and "b.cpp" in text and "c.cpp" not in text
    made = subprocess.run(["cmake", "--build", build, "-j", "2"], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    out = subprocess.run([build / "app"], capture_output=True, text=True, timeout=60).stdout
    assert out == "9 lib/a.cpp main.cpp\n"  # 2 + 3 + 4; no path outside the tree


def test_kiln_cmake_without_the_skip_fails_and_names_a_missing_target(tmp_path):
    build, done = configure_unity_project(tmp_path / "noskip", "lib", "")
    assert done.returncode == 0, done.stderr
    made = subprocess.run(["cmake", "--build", build], capture_output=True, text=True, timeout=300)
    assert made.returncode != 0 and "twice" in made.stdout + made.stderr  # the clash the skip list avoids
    _, done = configure_unity_project(tmp_path / "missing", "lib;llama-common", "")
    assert done.returncode != 0
    assert "no target 'llama-common'" in done.stderr and "stages.llamacpp.build.unity_targets" in done.stderr


def test_switching_quant_type_keeps_builds(project, monkeypatch):
    project.write("r.yaml", RK)
    before = keys(project, monkeypatch)
    project.write("r.yaml", RK.replace("gguf_types: [Q4_K_M]", "gguf_types: [Q8_0]"))
    after = keys(project, monkeypatch)
    for node in ("llamacpp.source", "llamacpp.build@host", "llamacpp.build@rk3568", "llamacpp.convert", "text",
                 "llamacpp.perplexity@float"):
        assert after[node] == before[node], node
    assert "llamacpp.quantize@Q8_0" in after and "llamacpp.quantize@Q4_K_M" not in after
    assert after["bundle"] != before["bundle"] and after["llamacpp.report"] != before["llamacpp.report"]


def test_missing_cross_compiler_names_the_apt_command(project, monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for exe in ("cmake", "gcc", "g++", "qemu-aarch64-static", "dpkg-query", "bible"):
        if shutil.which(exe):
            os.symlink(shutil.which(exe), bin_dir / exe)
    monkeypatch.setenv("PATH", str(bin_dir))
    tools.fingerprint.cache_clear()
    try:
        project.write("r.yaml", RK)
        specs = {s.stage: s for s in plan(load_recipe("r", project.settings(monkeypatch)))}
    finally:
        tools.fingerprint.cache_clear()
    blocked = specs["llamacpp.build@rk3568"].blocked
    assert blocked and "`aarch64-linux-gnu-gcc` is not installed: run `sudo apt-get install gcc-aarch64-linux-gnu`" in blocked
    assert specs["llamacpp.build@host"].blocked is None
    assert "aarch64-linux-gnu-gcc" in specs["llamacpp.verify@Q4_K_M"].blocked  # downstream says why


def test_bad_gguf_type_is_a_recipe_error(project, monkeypatch):
    from pipeline.engine.errors import RecipeError

    project.write("r.yaml", RK.replace("[Q4_K_M]", "[Q4_K_X]"))
    with pytest.raises(RecipeError, match=r"r.yaml:3: scheme.gguf_types\[0\]: expected one of 'Q2_K', .*got 'Q4_K_X'"):
        load_recipe("r", project.settings(monkeypatch))


def test_text_overlap_detection_and_kjv_slices():
    from pipeline.generic.text import kjv_text

    gen, exod = kjv_text("Gen1:1-2:3"), kjv_text("Exod1:1-1:10")
    assert gen.startswith("In the beginning God created the heaven and the earth.")
    assert not overlap(gen, exod)
    assert overlap(gen, kjv_text("Gen2:1-2:5"))


def test_elf_describe_reads_machine_and_linking():
    info = describe(__import__("pathlib").Path(shutil.which("gcc")).resolve())
    assert info["machine"] == "x86_64" and info["static"] is False


def test_text_from_a_dataset_in_the_hf_cache(project, tmp_path):
    import json as _json

    from conftest import fake_hf_cache

    def jsonl(prefix: str) -> bytes:
        return "".join(_json.dumps({"text": f"{prefix} sentence number {i} of a held out corpus for testing"}) + "\n"
                       for i in range(60)).encode()

    hub = tmp_path / "hub"
    fake_hf_cache(hub, "someorg/corpus", "dataset", {"data/train.jsonl": jsonl("calibration"),
                                                    "data/test.jsonl": jsonl("evaluation")})
    text = ("text:\n  calibration: {hf_dataset: someorg/corpus, path: data/train.jsonl}\n"
            "  evaluation: {hf_dataset: someorg/corpus, path: data/test.jsonl}\n")
    project.write("r.yaml", RK + text)
    project.doit("r:text", "recipe=r", HF_HUB_CACHE=str(hub))
    out = (project.artifacts / "r" / "text" / "evaluation.txt").read_text().splitlines()
    assert len(out) == 60 and out[0] == "evaluation sentence number 0 of a held out corpus for testing"

    project.write("r.yaml", RK + text.replace("data/test.jsonl", "data/train.jsonl"))
    proc = project.doit("r:text", "recipe=r", check=False, HF_HUB_CACHE=str(hub))
    assert proc.returncode != 0 and "calibration and evaluation text overlap (60 shared lines" in proc.stdout + proc.stderr


def test_text_dataset_missing_from_cache_says_how_to_get_it(project, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    project.write("r.yaml", RK + "text:\n  evaluation: {hf_dataset: org/absent, path: test.txt}\n")
    spec = {s.stage: s for s in plan(load_recipe("r", project.settings(monkeypatch)))}["text"]
    assert "hf download --repo-type dataset org/absent test.txt" in spec.blocked


def test_ship_primary_keeps_the_other_types_out_of_the_bundle_and_every_key(project, monkeypatch):
    three = RK.replace("gguf_types: [Q4_K_M]", "gguf_types: [Q2_K, Q8_0, Q4_K_M]")
    project.write("r.yaml", three)
    every = {s.stage: s for s in plan(load_recipe("r", project.settings(monkeypatch)))}
    project.write("r.yaml", three + "stages:\n  llamacpp.quantize: {ship: primary}\n")
    primary = {s.stage: s for s in plan(load_recipe("r", project.settings(monkeypatch)))}
    quantized = {n for n in every["bundle"].input_nodes if n.startswith("llamacpp.quantize@")}
    assert quantized == {"llamacpp.quantize@Q2_K", "llamacpp.quantize@Q8_0", "llamacpp.quantize@Q4_K_M"}
    assert [n for n in primary["bundle"].input_nodes if n.startswith("llamacpp.quantize@")] == ["llamacpp.quantize@Q2_K"]
    assert primary["llamacpp.package"].material["params"]["models"] == ["m-Q2_K.gguf"]
    # every variant is still built, verified and measured, under the same keys
    for node in ("llamacpp.quantize@Q8_0", "llamacpp.quantize@Q4_K_M", "llamacpp.verify@Q8_0", "llamacpp.perplexity@Q4_K_M",
                 "llamacpp.report"):
        assert primary[node].key == every[node].key, node
    project.write("r.yaml", three + "stages:\n  llamacpp.quantize: {ship: first}\n")
    with pytest.raises(KilnError, match=r"r.yaml:\d+: .*ship"):
        load_recipe("r", project.settings(monkeypatch))


def test_generated_tokens_are_read_from_llama_cpp_timings_and_eos_first_is_no_continuation():
    from pipeline.llamacpp.verify import continuation

    prompt_line = "common_perf_print: prompt eval time =   34000.00 ms /     7 tokens (  4857.14 ms per token)\n"
    decode_line = "common_perf_print:        eval time =   17615.49 ms /     {} runs   ( 5871.83 ms per token,     0.17 t/s)\n"
    assert continuation("Once upon", prompt_line + decode_line.format(3), "Once upon") == 3  # whitespace: counted
    assert continuation("Once upon a time", prompt_line, "Once upon") == 0  # visible text, no timings
    with pytest.raises(KilnError, match="no continuation"):  # EOS sampled first: nothing fed back, nothing shown
        continuation("Once upon", prompt_line + decode_line.format(0), "Once upon")
    with pytest.raises(KilnError, match="no continuation"):  # the prompt's token count is not a decode count
        continuation("Once upon", prompt_line, "Once upon")
