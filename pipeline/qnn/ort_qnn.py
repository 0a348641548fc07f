"""onnxruntime-qnn (PyPI): the QNN execution provider plugin with QNN's x86_64 libraries.

Two uses, both through ordinary onnxruntime sessions (docs/qualcomm.md#onnxruntime-qnn):
- offline compile: a session with `ep.context_enable` writes an EPContext ONNX and a real HTP
  context binary for the SoC named in the provider options; sessions created with
  `ep.share_ep_contexts` put their graphs into one weight-shared binary;
- the x86 HTP simulator: a session over an EPContext model (or a QDQ graph) with the HTP backend
  runs the binary's graphs bit-exactly as the DSP would, only slowly.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

from pipeline.engine.errors import KilnError, ToolMissing

EP = "QNNExecutionProvider"


def package_dir() -> Path:
    try:
        import onnxruntime_qnn
    except ImportError:
        raise ToolMissing("onnxruntime-qnn is not installed: `pip install onnxruntime-qnn==2.7.0` "
                          "(x86_64 Linux; `bash setup.sh` installs it)") from None
    return Path(onnxruntime_qnn.__file__).parent


def _devices() -> list[Any]:
    import onnxruntime as ort

    found = [d for d in ort.get_ep_devices() if d.ep_name == EP]
    if not found:  # first use in this process: register the plugin library
        import onnxruntime_qnn

        package_dir()
        ort.register_execution_provider_library(EP, onnxruntime_qnn.get_library_path())
        found = [d for d in ort.get_ep_devices() if d.ep_name == EP]
    return found


def session_options(soc_model: int, htp_arch: int, provider: dict[str, str] | None = None,
                    config: dict[str, str] | None = None) -> Any:
    """SessionOptions for the HTP backend of SoC `soc_model` / arch `htp_arch`; no CPU fallback, so
    a graph HTP cannot run whole fails here instead of quietly splitting."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_provider_for_devices(_devices(), {"backend_type": "htp", "htp_arch": str(htp_arch),
                                                  "soc_model": str(soc_model), **(provider or {})})
    for k, v in {"session.disable_cpu_ep_fallback": "1", **(config or {})}.items():
        options.add_session_config_entry(k, v)
    return options


def compile_graph(src: Path, ctx_model: Path, soc_model: int, htp_arch: int, provider: dict[str, str],
                  share: str = "") -> None:
    """Compile `src` into EPContext model `ctx_model` (+ its binary beside it). `share`: "" for a
    binary of its own, "share" to add the graph to this process's shared binary, "last" to add it
    and write the shared binary out."""
    import onnxruntime as ort

    # Loaded by its bare file name from inside its folder: onnxruntime names the compiled graphs by a
    # hash of the model's path, and the absolute one is a build's scratch dir, new every time; the
    # file name is the same for the same graph (and differs between the graphs of a shared binary).
    config = {"ep.context_enable": "1", "ep.context_file_path": str(ctx_model.resolve()), "ep.context_embed_mode": "0"}
    if share:
        config["ep.share_ep_contexts"] = "1"
    if share == "last":
        config["ep.stop_share_ep_contexts"] = "1"
    options = session_options(soc_model, htp_arch, provider, config)
    with contextlib.chdir(src.parent):
        ort.InferenceSession(src.name, options)


def simulator_session(model: Path, soc_model: int, htp_arch: int) -> Any:
    """A session running `model` (EPContext or QDQ ONNX) on the x86 HTP simulator."""
    import onnxruntime as ort

    return ort.InferenceSession(str(model), session_options(soc_model, htp_arch))


def rename_compiled_graph(ctx_model: Path, name: str) -> str:
    """Rename the graph an EPContext model runs, in its context binary and in the model, to `name`
    padded with '_' before its `_<i>_of_<n>` suffix to the old name's length; return the new name.

    onnxruntime-qnn names a compiled graph after a hash (`QNNExecutionProvider_..._<hash>_1_0`) and
    offers no option to choose it, while Genie orders the parts of a split model by graph names
    ending `_<i>_of_<n>` (docs/qualcomm.md#model-splitting). The binary stores the name as a
    length-prefixed string, so a name of the same length replaces it in place; libQnnSystem, the
    simulator and Genie read the renamed binary back (tests/qnn/test_verify_htp.py)."""
    import onnx

    model = onnx.load(str(ctx_model))
    node = next(n for n in model.graph.node if n.op_type == "EPContext")
    old = node.name
    # keep what tells the graphs apart (…_ar128_cl4096_1_of_2), shorten the model name in front
    match = re.fullmatch(r"(.*)(_ar\d+_cl\d+_\d+_of_\d+)", name)
    if match is None:
        raise KilnError(f"{ctx_model.name}: {name!r} is not a part's graph name (<model>_ar<N>_cl<N>_<i>_of_<n>)")
    model_name, tail = match.groups()
    if len(tail) > len(old):
        raise KilnError(f"{ctx_model.name}: graph name {name!r} cannot be fitted into onnxruntime's {len(old)} characters")
    stem = model_name[: len(old) - len(tail)]
    new = stem + "_" * (len(old) - len(stem) - len(tail)) + tail
    attrs = {a.name: a for a in node.attribute}
    binary = ctx_model.parent / attrs["ep_cache_context"].s.decode()
    data = binary.read_bytes()
    if data.count(old.encode()) == 0 or data.count(new.encode()):
        raise KilnError(f"{binary.name}: graph {old} is not in the context binary, or {new} already is")
    binary.write_bytes(data.replace(old.encode(), new.encode()))
    node.name = new
    if "partition_name" in attrs:
        attrs["partition_name"].s = new.encode()
    onnx.save(model, str(ctx_model))
    return new
