"""llamacpp.build: llama.cpp tools built with cmake, once for this host and once for the target CPU.

Variants: `host` (x86_64 tools Kiln runs here: llama-quantize, llama-perplexity,
llama-imatrix) and the target's name (a static cross-build of the tools the
bundle ships, e.g. aarch64 Cortex-A55 for rk3568: armv8.2-a+dotprod+fp16).
Only the listed targets are built. ccache lives in the store (`<store>/cache/ccache`)
with paths made relative to the store, so a rebuild of a new key reuses objects.
kiln_build.cmake, included into llama.cpp's CMake project, keeps the store's paths out of the
binaries (their bytes do not depend on where the store is) and compiles `llama-common` (argument
parsing, chat templates, JSON: half of a cold build's CPU time) as a unity build: the same code,
its headers parsed once per batch of 8 files.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from pipeline.engine.errors import KilnError
from pipeline.engine.fields import CmakeDefine, Token, TreeFile
from pipeline.engine.proc import build_jobs, run_tool
from pipeline.engine.stage import StageContext, Strict
from pipeline.engine.templating import TEMPLATES
from pipeline.llamacpp.common import BUILD, SOURCE, SOURCE_INFO, TASK_RUNNER, LlamacppStage
from pipeline.llamacpp.elf import describe

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe

TOOLCHAIN_TEMPLATE = "llamacpp/toolchain.cmake.j2"
KILN_CMAKE = Path(__file__).with_name("kiln_build.cmake")
CROSS_TRIPLE = {"aarch64": "aarch64-linux-gnu"}
# x86-64-v3 spelled out: the host build must not depend on which CPU built it (GGML_NATIVE=OFF).
HOST_X86_FEATURES = ["-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON"]


class BuildParams(Strict):
    device_tools: list[Token] = Field(
        ["llama-cli", "llama-completion", "llama-bench", "llama-perplexity"],
        description="Targets of the static cross-build shipped in the bundle (`llama-cli` also builds the server, +4 min cold).",
    )
    host_tools: list[Token] = Field(
        ["llama-quantize", "llama-perplexity", "llama-imatrix"], description="Targets built for this host."
    )
    build_type: Token = Field("Release", description="CMAKE_BUILD_TYPE.")
    cmake_args: list[CmakeDefine] = Field([], description="Extra -D options for both builds.")
    unity_targets: list[Token] = Field(
        ["llama-common"],
        description="CMake targets compiled as unity builds, a batch of sources per compiler run (llama-common: "
                    "408 -> 208 CPU s cold); [] compiles every file alone.",
    )
    unity_batch: int = Field(8, ge=2, le=64, description="Sources per unity batch.")
    unity_skip: list[TreeFile] = Field(
        ["json.cpp"], max_length=64,
        description="Sources of the unity targets compiled alone, relative to the target's folder (the vendored "
                    "tree's common/json.cpp specializes templates its batch has already instantiated).",
    )


def unity_flags(targets: list[str], batch: int, skip: list[str]) -> list[str]:
    """The -D options kiln_build.cmake reads."""
    return [f"-DKILN_UNITY_TARGETS={';'.join(targets)}", f"-DKILN_UNITY_BATCH={batch}",
            f"-DKILN_UNITY_SKIP={';'.join(skip)}"]


def cmake_flags(static: bool, march: str, tools: list[str], build_type: str, extra: list[str], x86: bool) -> list[str]:
    flags = [
        f"-DCMAKE_BUILD_TYPE={build_type}", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF",
        "-DGGML_OPENMP=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
        f"-DLLAMA_BUILD_SERVER={'ON' if 'llama-cli' in tools or 'llama-server' in tools else 'OFF'}",
    ]
    if static:
        flags += ["-DGGML_STATIC=ON", "-DCMAKE_EXE_LINKER_FLAGS=-static"]
    if march:
        flags.append(f"-DGGML_CPU_ARM_ARCH={march}")
    if x86:
        flags += HOST_X86_FEATURES
    return flags + list(extra)


class LlamacppBuild(LlamacppStage):
    """llama.cpp tools for this host and for the target."""

    name = BUILD
    version = 4  # 4: kiln_build.cmake: no store path in the binaries, llama-common as a unity build
    Params = BuildParams
    resource = "heavy"

    @classmethod
    def variants(cls, recipe: Recipe) -> list[str]:
        return ["host", recipe.target.name]

    requires = (SOURCE,)

    @classmethod
    def ships(cls, recipe: Recipe, variant: str) -> str | None:
        return None if variant == "host" else "."

    @classmethod
    def params(cls, recipe: Recipe, variant: str) -> dict[str, Any]:
        own = recipe.stage_params(cls.name)
        cpu = recipe.target.cpu
        host = variant == "host"
        tools = own["host_tools"] if host else own["device_tools"]
        if host and recipe.spec.eval.tasks and TASK_RUNNER not in tools:
            tools = [*tools, TASK_RUNNER]  # llamacpp.tasks generates the answers on the host build
        arch = "x86_64" if host else cpu.arch
        return {
            "arch": arch, "tools": tools, "static": not host, "triple": None if host else CROSS_TRIPLE.get(arch),
            "core": "host" if host else cpu.core,
            "cmake_args": cmake_flags(static=not host, march="" if host else cpu.march, tools=tools,
                                      build_type=own["build_type"], extra=own["cmake_args"], x86=arch == "x86_64"),
            "unity_args": unity_flags(own["unity_targets"], own["unity_batch"], own["unity_skip"]),
        }

    @classmethod
    def sources(cls, recipe: Recipe, variant: str) -> dict[str, Path]:
        own = {"kiln_cmake": KILN_CMAKE}
        return own if variant == "host" else {**own, "toolchain_template": TEMPLATES / TOOLCHAIN_TEMPLATE}

    @classmethod
    def tool_names(cls, recipe: Recipe, variant: str) -> tuple[str, ...]:
        if variant == "host":
            return ("exe:cmake", "exe:gcc", "exe:g++")
        triple = CROSS_TRIPLE.get(recipe.target.cpu.arch)
        if triple is None:
            raise KilnError(f"{recipe.where('target')}: no cross toolchain known for arch {recipe.target.cpu.arch}")
        return ("exe:cmake", f"exe:{triple}-gcc", f"exe:{triple}-g++")

    def run(self, ctx: StageContext) -> None:
        p = ctx.params
        tree = ctx.inputs[SOURCE]
        commit = json.loads((tree / SOURCE_INFO).read_text()).get("commit")
        build = ctx.tmp / "build"  # never published
        build.mkdir()
        flags = [*p["cmake_args"], f"-DCMAKE_PROJECT_INCLUDE={ctx.sources['kiln_cmake']}", *p["unity_args"]]
        if commit:
            flags.append(f"-DLLAMA_BUILD_COMMIT={commit[:7]}")
        if p["triple"]:
            from pipeline.engine.templating import render

            toolchain = build / "toolchain.cmake"
            toolchain.write_text(render(TOOLCHAIN_TEMPLATE, triple=p["triple"], arch=p["arch"], core=p["core"],
                                        emulator=shutil.which("qemu-aarch64-static")))
            flags.append(f"-DCMAKE_TOOLCHAIN_FILE={toolchain}")
        store_root = ctx.cache.parent
        # ggml's CMakeLists asks `git rev-parse HEAD` in its own folder and compiles the answer in;
        # the source tree has no .git, so git would find whatever repository holds the store (a
        # Kiln checkout: its commit) and the binaries' bytes would depend on where the store is.
        # Git stops at the tree: ggml's commit reads "unknown" everywhere.
        env = {"CCACHE_DIR": str(ctx.cache / "ccache"), "CCACHE_BASEDIR": str(store_root),
               "CCACHE_NOHASHDIR": "1", "CCACHE_COMPILERCHECK": "content", "CCACHE_MAXSIZE": "2G",
               "GIT_CEILING_DIRECTORIES": str(Path(tree).resolve().parent)}
        if shutil.which("ccache"):
            flags += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
        else:
            ctx.log.info("ccache not found (apt-get install ccache): building without it")
        run_tool(["cmake", "-S", tree, "-B", build, *flags], env=env)
        run_tool(["cmake", "--build", build, "--target", *p["tools"], "-j", build_jobs()], env=env)
        (ctx.out / "bin").mkdir()
        info = {}
        for tool in p["tools"]:
            dst = ctx.out / "bin" / tool
            shutil.copy2(build / "bin" / tool, dst)
            info[tool] = describe(dst)
            if info[tool]["machine"] != p["arch"] or (p["static"] and not info[tool]["static"]):
                raise KilnError(f"{tool}: built for {info[tool]}, expected {p['arch']}{' static' if p['static'] else ''}")
        (ctx.out / "bin" / "binaries.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(build)
        ctx.log.info(f"built {', '.join(p['tools'])} for {p['arch']} ({'static' if p['static'] else 'dynamic'})")
