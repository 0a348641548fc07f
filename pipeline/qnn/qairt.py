"""qnn.compile provider `qairt`: Qualcomm's own QAIRT SDK command-line tools, for users who have the SDK.

Why a second provider: `ort-qnn` (pipeline/qnn/ort_qnn.py) compiles through onnxruntime-qnn from PyPI,
which needs nothing from Qualcomm's download site; this one runs the flow Qualcomm documents for
Genie LLM bundles, on the SDK the user installed and points `QNN_SDK_ROOT` at:

1. per AR graph, `qairt-converter`: QDQ ONNX -> DLC, with the AIMET encodings as
   `--quantization_overrides` (the graph takes the name of the output DLC's stem);
2. per AR graph, `qairt-quantizer`: applies those encodings to the DLC (no calibration data);
3. once, `qnn-context-binary-generator` over all the quantized DLCs (`--dlc_path a.dlc,b.dlc`) with an
   HTP backend-extension config asking for weight sharing: ONE context binary holding every graph,
   `weight_sharing_model_1_of_1.serialized.bin`, the file Genie's `ctx-bins` lists.

Where the flag spellings come from (the SDK cannot be installed here; tests/qnn/qairt_doubles stand in):
- Qualcomm's Llama-3.2 Genie notebook pipeline (its `QairtCompile` class; public copies are on GitHub)
  runs exactly this:
    qairt-converter --input_network X.onnx --quantization_overrides X.encodings -o X.dlc
    qairt-quantizer --input_dlc X.dlc --output_dlc X_quantized.dlc ...
    qnn-context-binary-generator --backend libQnnHtp.so --model libQnnModelDlc.so
        --input_output_tensor_mem_type memhandle --output_dir D --config_file C
        --binary_file weight_sharing_model_1_of_1.serialized --dlc_path ar128.dlc,ar1.dlc
  (`-o` is short for `--output_path`, the spelling used here), with C = {"backend_extensions":
  {"shared_library_path": "libQnnHtpNetRunExtensions.so", "config_file_path": inner}} and the inner
  config holding `graphs[{O, vtcm_mb, graph_names}]`, `devices[{soc_id|soc_model, dsp_arch, cores[...]}]`,
  `context{weight_sharing_enabled}`, `memory{mem_type: shared_buffer}`.
- QAIRT docs (docs.qualcomm.com 80-63442-10, "Qairt Converter" / "Qairt Quantizer"): `--input_network`
  is the converter's one required argument; the quantizer takes `--input_dlc` / `--output_dlc`.
- The quantizer's own argparse source (QAIRT's lib/python; copies are on GitHub): `--float_fallback`
  ("then input list must not be provided"; newer SDKs spell it `--enable_float_fallback` and keep
  `--float_fallback` as a hidden alias, so the old spelling works on both), `--float_bitwidth`.
- microsoft/Olive `olive/passes/qnn/context_binary_generator.py`: with `--dlc_path` the model is
  `$QNN_SDK_ROOT/lib/<arch>/libQnnModelDlc.so`, and the binary is written to
  `<--output_dir>/<--binary_file>.bin` (the tool appends `.bin`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.engine.errors import KilnError, ToolMissing
from pipeline.engine.proc import run_tool
from pipeline.qnn.common import BINARY_STEM, SHARED_BIN

HOST = "x86_64-linux-clang"  # the SDK's folder name for x86_64 Linux host tools and libraries
TOOLS = ("qairt-converter", "qairt-quantizer", "qnn-context-binary-generator")
HTP_BACKEND = "libQnnHtp.so"
DLC_MODEL = "libQnnModelDlc.so"  # lets qnn-context-binary-generator read graphs from DLCs
HTP_EXTENSIONS = "libQnnHtpNetRunExtensions.so"  # reads the HTP backend-extension config
LIBS = (HTP_BACKEND, DLC_MODEL, HTP_EXTENSIONS)
OUTER_CONFIG = "qnn_context_binary_config.json"  # what --config_file names
INNER_CONFIG = "htp_backend_ext_compile.json"  # its backend_extensions.config_file_path

_GET_SDK = ("the `qairt` provider of stages.qnn.compile needs Qualcomm's QAIRT SDK (Qualcomm AI Runtime SDK): "
            "download it from https://qpm.qualcomm.com (or https://softwarecenter.qualcomm.com), unpack it and "
            "`export QNN_SDK_ROOT=<dir>` (the folder holding bin/, lib/ and sdk.yaml, e.g. qairt/2.39.0.250926). "
            "Without it, set `stages.qnn.compile.provider: ort-qnn`, which needs only onnxruntime-qnn from PyPI")


def sdk_root() -> Path:
    """$QNN_SDK_ROOT, checked to hold the three tools and the libraries compile_shared uses."""
    value = os.environ.get("QNN_SDK_ROOT", "").strip()
    if not value:
        raise ToolMissing(f"QNN_SDK_ROOT is not set: {_GET_SDK}")
    root = Path(value).expanduser()
    if not root.is_dir():
        raise ToolMissing(f"QNN_SDK_ROOT={value} is not a folder: {_GET_SDK}")
    missing = [p for p in _required_paths(root) if not p.is_file()]
    if missing:
        raise ToolMissing(f"QNN_SDK_ROOT={value} is not a complete QAIRT SDK: {', '.join(map(str, missing))} "
                          f"missing (unpack the whole SDK there). {_GET_SDK}")
    not_exe = [p for p in (root / "bin" / HOST / t for t in TOOLS) if not os.access(p, os.X_OK)]
    if not_exe:
        raise ToolMissing(f"{', '.join(map(str, not_exe))} not executable: `chmod +x` it or unpack the SDK again")
    return root


def _required_paths(root: Path) -> list[Path]:
    return [root / "bin" / HOST / t for t in TOOLS] + [root / "lib" / HOST / lib for lib in LIBS]


def available() -> bool:
    """Whether QNN_SDK_ROOT is set and complete (what provider `auto` asks)."""
    try:
        sdk_root()
    except ToolMissing:
        return False
    return True


def sdk_version(root: Path) -> str:
    """The SDK's version, part of the qnn.compile stage key: upgrading the SDK recompiles.

    QAIRT ships `sdk.yaml` at its root with `version:` (and on recent SDKs `build_id:`) lines: onnxruntime's
    tools/ci_build/github/android/build_aar_package.py reads `version:` from `<qnn_home>/sdk.yaml` the same
    way, and user scripts check `^version: 2\\.48\\.40$` / `^build_id: ...$` in it. Without it, the root
    folder's name (Qualcomm's archive unpacks to qairt/<version>, e.g. qairt/2.39.0.250926).
    """
    fields = _yaml_scalars(root / "sdk.yaml")
    version = fields.get("version")
    if not version:
        return root.resolve().name
    build = fields.get("build_id")
    return f"{version}+{build}" if build and build not in version else version


def _yaml_scalars(path: Path) -> dict[str, str]:
    """Top-level `key: value` lines of a flat YAML file (no PyYAML needed for sdk.yaml)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if line[:1].isspace() or ":" not in line or line.lstrip().startswith("#"):
            continue
        key, value = line.split(":", 1)
        fields[key.strip()] = value.split(" #", 1)[0].strip().strip("'\"")
    return fields


def compile_shared(root: Path, graphs: list[tuple[str, Path, Path]], soc_model: int, dsp_arch: str, out: Path, *,
                   vtcm_mb: int = 0, finalization_level: int = 3, perf_profile: str = "burst") -> Path:
    """Every AR graph into ONE weight-shared HTP context binary; returns out / SHARED_BIN.

    graphs: (graph name, QDQ ONNX, AIMET encodings JSON) per AR graph, widest first (the order of the
    graphs in the binary). dsp_arch is QNN's spelling, e.g. "v79". Writes the DLCs and the configs it
    passes into `out`.
    """
    _check_graphs(graphs)
    if finalization_level not in (0, 1, 2, 3):
        raise KilnError(f"HTP finalization level must be 0..3, not {finalization_level}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = _tool_env(root)
    dlcs = [_convert_and_quantize(root, name, Path(onnx), Path(enc), out, env) for name, onnx, enc in graphs]
    config = write_configs(root, out, [name for name, _, _ in graphs], soc_model, dsp_arch,
                           vtcm_mb=vtcm_mb, finalization_level=finalization_level, perf_profile=perf_profile)
    return _generate_binary(root, dlcs, config, out, env)


def _check_graphs(graphs: list[tuple[str, Path, Path]]) -> None:
    if not graphs:
        raise KilnError("compile_shared needs at least one graph")
    names = [name for name, _, _ in graphs]
    for name in names:
        # The name becomes a file stem and a --dlc_path list entry: no separators, no commas.
        if not name or any(c in name for c in "/\\,") or name.startswith("."):
            raise KilnError(f"graph name {name!r} cannot be a DLC file name")
    if len(set(names)) != len(names):
        raise KilnError(f"graph names repeat: {names}")
    for name, onnx, enc in graphs:
        for path in (onnx, enc):
            if not Path(path).is_file():
                raise KilnError(f"graph {name}: {path} does not exist")


def _tool_env(root: Path) -> dict[str, str]:
    """What the SDK's bin/envsetup.sh would set: its Python package, its host libraries."""
    def prepend(var: str, path: Path) -> str:
        old = os.environ.get(var, "")
        return f"{path}{os.pathsep}{old}" if old else str(path)

    return {"QNN_SDK_ROOT": str(root), "PYTHONPATH": prepend("PYTHONPATH", root / "lib" / "python"),
            "LD_LIBRARY_PATH": prepend("LD_LIBRARY_PATH", root / "lib" / HOST)}


def _tool(root: Path, name: str) -> Path:
    return root / "bin" / HOST / name


def _convert_and_quantize(root: Path, name: str, onnx: Path, encodings: Path, out: Path,
                          env: dict[str, str]) -> Path:
    """qairt-converter then qairt-quantizer for one graph; returns its quantized DLC.

    Both DLCs keep the graph name as their stem: the converter names the graph after its output file,
    and the context config's graph_names must match.
    """
    converted = out / "converted" / f"{name}.dlc"
    quantized = out / "quantized" / f"{name}.dlc"
    _run(_tool(root, "qairt-converter"), ["--input_network", onnx.resolve(),
                                          "--quantization_overrides", encodings.resolve(),
                                          "--output_path", converted], converted, env, out)
    # Kiln's encodings cover the graph; no calibration list. --float_fallback fills any tensor the converter
    # added (math-invariant ops first, else float), float16 because HTP has no float32 ALU.
    _run(_tool(root, "qairt-quantizer"), ["--input_dlc", converted, "--output_dlc", quantized,
                                          "--float_fallback", "--float_bitwidth", "16"], quantized, env, out)
    return quantized


def write_configs(root: Path, out: Path, graph_names: list[str], soc_model: int, dsp_arch: str, *,
                  vtcm_mb: int = 0, finalization_level: int = 3, perf_profile: str = "burst") -> Path:
    """The two JSON files behind `qnn-context-binary-generator --config_file`; returns the outer one.

    The outer file names the HTP extension library and the inner config; the inner one is the
    HTP backend-extension config (docs/qualcomm.md#htp-backend-extension-config) plus per-graph compile options.
    """
    inner = {
        # cores matter to a runner, not to the compiler; Qualcomm's notebook passes them anyway. (One user report
        # has a QAIRT 2.48 Windows generator rejecting them as "Unknown Key": the first place to look if so.)
        "devices": [{"soc_model": int(soc_model), "dsp_arch": dsp_arch,
                     "cores": [{"core_id": 0, "perf_profile": perf_profile, "rpc_control_latency": 100}]}],
        "memory": {"mem_type": "shared_buffer"},
        "context": {"weight_sharing_enabled": True},
        "graphs": [{"graph_names": list(graph_names), "vtcm_mb": int(vtcm_mb), "O": int(finalization_level)}],
    }
    inner_path = out / INNER_CONFIG
    _write_json(inner_path, inner)
    # Absolute paths: a relative config_file_path is resolved against the tool's working directory, and an
    # absolute library path does not depend on LD_LIBRARY_PATH.
    outer = {"backend_extensions": {"shared_library_path": str(root / "lib" / HOST / HTP_EXTENSIONS),
                                    "config_file_path": str(inner_path)}}
    outer_path = out / OUTER_CONFIG
    _write_json(outer_path, outer)
    return outer_path


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _generate_binary(root: Path, dlcs: list[Path], config: Path, out: Path, env: dict[str, str]) -> Path:
    target = out / SHARED_BIN
    lib = root / "lib" / HOST
    _run(_tool(root, "qnn-context-binary-generator"),
         ["--backend", lib / HTP_BACKEND, "--model", lib / DLC_MODEL,
          "--dlc_path", ",".join(str(d) for d in dlcs),
          "--config_file", config,
          # As Qualcomm's Genie notebook does: graph I/O as memory handles (Genie uses shared buffers).
          "--input_output_tensor_mem_type", "memhandle",
          "--binary_file", BINARY_STEM, "--output_dir", out],
         target, env, out)
    return target


def _run(tool: Path, args: list[str | Path], expected: Path, env: dict[str, str], cwd: Path) -> None:
    """Run one SDK tool (argv list, output captured for the error message) and check it wrote `expected`."""
    expected.parent.mkdir(parents=True, exist_ok=True)
    expected.unlink(missing_ok=True)  # a stale file from an earlier run must not pass for this run's output
    proc = run_tool([tool, *args], env=env, cwd=cwd, capture=True)
    output = (proc.stdout + proc.stderr).strip()
    if output:
        print(output, flush=True)  # into the stage log, as an uncaptured tool's output would be
    if not expected.is_file() or expected.stat().st_size == 0:
        tail = "\n".join(output.splitlines()[-15:])
        raise KilnError(f"{tool.name} exited 0 but wrote no {expected}" + (f"\n{tail}" if tail else ""))
