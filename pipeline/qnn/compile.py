"""qnn.compile: the quantize stage's QDQ graphs → HTP context binaries for the target SoC.

Provider `ort-qnn` (onnxruntime-qnn from PyPI): each AR graph is first put in its device form
(pipeline/qnn/htp_graph.py: quantized I/O under Genie's tensor names, embedding table on its Gather
grid), then compiled by onnxruntime-qnn with no CPU fallback, twice:
- `shared/`: every AR graph in ONE weight-shared binary (`weight_sharing_model_1_of_1.serialized.bin`,
  the name qnn-context-binary-generator gives it) + one EPContext ONNX per graph — what
  qnn.package ships as `models/`;
- `unshared/`: one binary per graph — what the x86 HTP simulator can load (it crashes on shared
  binaries: docs/qualcomm.md#weight-sharing), for `verify`.
A model too large for one HTP context is cut into parts of consecutive decoder layers
(`num_splits`; docs/qualcomm.md#model-splitting): each AR graph becomes `<graph>_<i>_of_<n>`, and
each part's AR graphs share one binary, `weight_sharing_model_<i>_of_<n>.serialized.bin`.
Every binary is read back through libQnnSystem (pipeline/qnn/qnn_binary.py) and checked against the
recipe: the target's soc model, one graph per AR length, the expected I/O. io.json lists each
graph's device I/O (dtype, shape, scale/offset) for qnn.genie_config and verify.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from pipeline.engine.errors import KilnError, ToolFlaked
from pipeline.engine.progress import progress
from pipeline.engine.stage import StageContext, Strict

# the SDK tool's name for the shared binary; ort-qnn's is renamed to it
from pipeline.qnn.common import (
    COMPILE,
    EXPORT,
    QUANTIZE,
    SHARED_BIN,
    GraphStage,
    export_nodes,
    provider,
    shared_bin,
    soc_params,
    split_count,
)

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe


class QnnCompileParams(Strict):
    provider: Literal["auto", "ort-qnn", "qairt"] = Field(
        "auto", description="Who compiles the shipped binary: `qairt` (Qualcomm's SDK at $QNN_SDK_ROOT: qairt-converter "
                            "with the encodings as overrides, qairt-quantizer, qnn-context-binary-generator) or `ort-qnn` "
                            "(onnxruntime-qnn from PyPI); auto = qairt when QNN_SDK_ROOT holds the SDK, else ort-qnn. "
                            "The simulator's unshared binaries always come from ort-qnn.")
    performance_mode: Literal["default", "burst", "balanced", "high_performance", "sustained_high_performance",
                              "power_saver", "low_power_saver", "high_power_saver", "low_balanced",
                              "extreme_power_saver"] = Field(
        "burst", description="HTP performance mode the EPContext models ask for at run time (ORT runtime).")
    vtcm_mb: int = Field(0, ge=0, description="VTCM the graphs may use, in MB; 0 = the SoC's default.")
    finalization_level: Literal[0, 1, 2, 3] = Field(
        3, description="HTP graph finalization optimization level: 3 = slowest to compile, fastest to run.")
    num_splits: Literal["auto"] | Annotated[int, Field(ge=1, le=64)] = Field(
        "auto", description="Parts the model is cut into (consecutive decoder layers each; every part's AR graphs "
                            "share one binary, Genie runs them in order). auto = the fewest parts whose estimated "
                            "HTP allocation stays within max_part_mb.")
    max_part_mb: int = Field(2048, ge=64, le=1 << 20, description="With num_splits: auto, the most HTP memory one part "
                             "may ask for: its weights on their grids plus its KV cache at the context length.")


class QnnCompile(GraphStage):
    """HTP context binaries: one weight-shared (ships) and one per AR graph (simulator)."""

    name = COMPILE
    version = 4  # 2: RMSNorm fused into one op (float16 overflow on HTP otherwise); 3: reproducible graph names;
    # 4: compile timings in ctx.info, not compile.json
    Params = QnnCompileParams
    retries = 2  # QNN's HTP compile fails now and then on a graph a rerun compiles (ToolFlaked)
    tools = ("python", "onnx", "onnxruntime", "onnxruntime-qnn", "numpy")

    @classmethod
    def inputs(cls, recipe: Recipe, variant: str = "") -> list[str]:
        # qairt-converter reads the float graphs (with the encodings as overrides), as in Qualcomm's own flow
        return [QUANTIZE, *(export_nodes(recipe) if provider(recipe) == "qairt" else [])]

    @classmethod
    def params(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        from pipeline.qnn import qairt

        soc = soc_params(recipe)
        chosen = provider(recipe)
        sdk = qairt.sdk_version(qairt.sdk_root()) if chosen == "qairt" else None  # the SDK's error if missing
        own = {k: v for k, v in recipe.stage_params(cls.name).items() if k not in ("num_splits", "max_part_mb")}
        return {**own, "provider": chosen, "qairt_sdk": sdk, **soc, "parts": split_count(recipe),
                "ar_lengths": sorted(set(recipe.spec.ar_lengths), reverse=True)}

    def run(self, ctx: StageContext) -> None:
        from pipeline.qnn.htp_graph import write_device_graphs
        from pipeline.qnn.ort_qnn import rename_compiled_graph
        from pipeline.qnn.qnn_binary import check_binary, read_binary_info

        p = ctx.params
        graphs = json.loads((ctx.inputs[QUANTIZE] / "quantize.json").read_text())["graphs"]
        graphs = sorted(graphs, key=lambda g: -g["ar"])
        options = {"htp_performance_mode": p["performance_mode"],
                    "htp_graph_finalization_optimization_mode": str(p["finalization_level"])}
        if p["vtcm_mb"]:
            options["vtcm_mb"] = str(p["vtcm_mb"])
        scratch = ctx.tmp / "device"
        scratch.mkdir()
        for sub in ("shared", "unshared"):
            (ctx.out / sub).mkdir()
        io: dict[str, Any] = {}
        timings: dict[str, float] = {}
        parts = p["parts"]
        for g in graphs:
            t0 = time.monotonic()
            for i, (name, ins, outs) in enumerate(write_device_graphs(ctx.inputs[QUANTIZE] / g["qdq"], scratch, parts), 1):
                io[name] = {"ar": g["ar"], **({"whole": g["graph"], "part": i, "parts": parts} if parts > 1 else {}),
                            "inputs": [t.to_json() for t in ins], "outputs": [t.to_json() for t in outs]}
            timings[f"device form {g['graph']}"] = round(time.monotonic() - t0, 1)
        target = (p["soc_model"], p["htp_arch"], options)
        for name in progress(list(io), "compile (unshared)", "graph"):
            ctx.log.info(f"compiling {name} for {p['soc']} (soc_model {p['soc_model']}, v{p['htp_arch']})")
            t0 = time.monotonic()
            compile_in_child([(scratch / f"{name}.onnx", ctx.out / "unshared" / f"{name}.onnx", "")], *target)
            if parts > 1:  # Genie orders the parts by their graph names
                rename_compiled_graph(ctx.out / "unshared" / f"{name}.onnx", name)
            timings[name] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        if p["provider"] == "qairt":
            _qairt_shared(ctx, graphs)
        else:
            for part in range(1, parts + 1):
                names = [n for n, v in io.items() if v.get("part", 1) == part]  # widest AR first
                compile_in_child([(scratch / f"{name}.onnx", ctx.out / "shared" / f"{name}.onnx",
                                   "last" if i == len(names) - 1 else "share") for i, name in enumerate(names)], *target)
                _rename_shared_binary(ctx.out / "shared", shared_bin(part, parts), names)
                for name in names if parts > 1 else []:
                    rename_compiled_graph(ctx.out / "shared" / f"{name}.onnx", name)
        timings["shared"] = round(time.monotonic() - t0, 1)

        expected = {g: {"inputs": [t["name"] for t in v["inputs"]], "outputs": [t["name"] for t in v["outputs"]]}
                    for g, v in io.items()}
        binaries: dict[str, Any] = {}
        problems: list[str] = []
        for b in sorted((ctx.out / "shared").glob("*.bin")) + sorted((ctx.out / "unshared").glob("*.bin")):
            rel = str(b.relative_to(ctx.out))
            info = read_binary_info(b)
            if b.parent.name == "shared":
                part = next((i for i in range(1, parts + 1) if b.name == shared_bin(i, parts)), None)
                if part is None:
                    raise KilnError(f"qnn.compile: unexpected binary {rel} beside the {parts} part(s)' shared binaries")
                want = {g: e for g, e in expected.items() if io[g].get("part", 1) == part}
            else:
                want = {g: e for g, e in expected.items() if b.name == f"{g}_qnn.bin"}
            found = _match_graphs(info, io, want)
            problems += [f"{rel}: {m}" for m in check_binary(info, p["soc_model"], found)]
            binaries[rel] = {"bytes": b.stat().st_size, "soc_model": info.get("soc_model"),
                             "graphs": {g["name"]: {"ar": _ar_of(g)} for g in info["graphs"]}, "info": info}
        report = {"provider": p["provider"], "soc": p["soc"], "soc_model": p["soc_model"], "htp_arch": p["htp_arch"],
                  "provider_options": options, "binaries": binaries, "problems": problems}
        (ctx.out / "io.json").write_text(json.dumps(io, indent=2) + "\n")
        (ctx.out / "compile.json").write_text(json.dumps(report, indent=2) + "\n")
        (ctx.info / "timings.json").write_text(json.dumps({"seconds": timings}, indent=2) + "\n")  # not the output
        for part in range(1, parts + 1):
            shared = binaries[f"shared/{shared_bin(part, parts)}"]
            graphs_of = ", ".join(f"{n} (AR-{g['ar']})" for n, g in shared["graphs"].items())
            ctx.log.info(f"shared binary {part} of {parts}: {shared['bytes'] / 1e6:.1f} MB, soc_model "
                         f"{shared['soc_model']}, graphs {graphs_of}")
        if problems:
            raise KilnError("qnn.compile: the compiled binaries do not match the recipe:\n  " + "\n  ".join(problems))


def _compile_jobs(jobs: list[tuple[Path, Path, str]], soc_model: int, htp_arch: int, options: dict[str, str]) -> None:
    from pipeline.qnn.ort_qnn import compile_graph

    for src, dst, share in jobs:
        compile_graph(src, dst, soc_model, htp_arch, options, share=share)


def compile_in_child(jobs: list[tuple[Path, Path, str]], soc_model: int, htp_arch: int, options: dict[str, str]) -> None:
    """Run ort_qnn.compile_graph over `jobs` (source, EPContext model, share mode) in a fresh
    process. QNN's graph preparation peaks at several GB for a 1B graph and the allocator of the
    process that ran it keeps that memory; a child gives it back on exit, so the unshared graphs
    and each part's shared binary never add up. A weight-shared binary's graphs must be compiled
    in one process (the sharing lives in it): one call, one part."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            pool.submit(_compile_jobs, jobs, soc_model, htp_arch, options).result()
    except BrokenProcessPool:
        raise KilnError(f"qnn.compile: the process compiling {', '.join(src.name for src, _, _ in jobs)} died "
                        "(killed for memory? see the stage's peak RSS)") from None
    except KilnError:
        raise
    except Exception as e:  # QNN's compiler through onnxruntime: known to fail now and then
        raise ToolFlaked(f"qnn.compile: QNN failed compiling {', '.join(src.name for src, _, _ in jobs)}: "
                         f"{str(e).splitlines()[0][:300] if str(e) else type(e).__name__}") from None


def _qairt_shared(ctx: StageContext, graphs: list[dict[str, Any]]) -> None:
    """The shipped binary from the QAIRT SDK: float graph + encodings per AR graph, weight-shared."""
    from pipeline.qnn import qairt

    p = ctx.params
    exports = {json.loads((d / "export.json").read_text())["graph"]: d
               for n, d in ctx.inputs.items() if n.startswith(EXPORT)}
    work = ctx.tmp / "qairt"
    ctx.log.info(f"compiling {len(graphs)} graphs with QAIRT {p['qairt_sdk']} (weight-shared)")
    binary = qairt.compile_shared(
        qairt.sdk_root(), [(g["graph"], exports[g["graph"]] / f"{g['graph']}.onnx",
                            ctx.inputs[QUANTIZE] / g["encodings"]) for g in graphs],
        p["soc_model"], f"v{p['htp_arch']}", work, vtcm_mb=p["vtcm_mb"], finalization_level=p["finalization_level"])
    binary.rename(ctx.out / "shared" / SHARED_BIN)


def _rename_shared_binary(shared: Path, name: str, graphs: list[str]) -> None:
    """Give the shared binary onnxruntime-qnn just wrote for `graphs` its SDK name and point their
    EPContext models at it."""
    import onnx

    bins = sorted(b for b in shared.glob("*.bin") if not b.name.startswith("weight_sharing_model_"))
    if len(bins) != 1:
        raise KilnError(f"qnn.compile: expected one weight-shared binary, onnxruntime-qnn wrote {[b.name for b in bins]}")
    bins[0].rename(shared / name)
    for graph in graphs:
        model_path = shared / f"{graph}.onnx"
        model = onnx.load(str(model_path))
        for node in model.graph.node:
            for a in node.attribute:
                if node.op_type == "EPContext" and a.name == "ep_cache_context":
                    a.s = name.encode()
        onnx.save(model, str(model_path))


def _ar_of(graph: dict[str, Any]) -> int | None:
    """A binary graph's AR length: the rows of its `attention_mask` [1, 1, AR, context] (every part
    has one; ORT names graphs by hash)."""
    mask = next((t for t in graph["inputs"] if t["name"] == "attention_mask"), None)
    return mask["dims"][-2] if mask else None


def _match_graphs(info: dict[str, Any], io: dict[str, Any], want: dict[str, Any]) -> dict[str, Any]:
    """Expected I/O keyed by the binary's own graph names, matched on AR length."""
    by_ar = {io[g]["ar"]: e for g, e in want.items()}
    found = {g["name"]: by_ar.pop(_ar_of(g)) for g in info["graphs"] if _ar_of(g) in by_ar}
    # what no binary graph matched is reported missing under its ONNX name
    found.update({g: e for g, e in want.items() if io[g]["ar"] in by_ar})
    return found
