"""Planning helpers shared by the Qualcomm stages: node names, the SoC and compile provider a
recipe asks for, the Genie values several stages key on. Stage modules import this, never each
other, so each stays a leaf the registry alone imports."""
from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.engine.errors import KilnError
from pipeline.engine.stage import Stage, node_id

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe

RUNTIME = "genie"  # the target runtime every Qualcomm stage serves
EXPORT, QUANTIZE, COMPILE, GENIE_CONFIG = "qnn.export", "qnn.quantize", "qnn.compile", "qnn.genie_config"
PERPLEXITY, TASKS = "qnn.perplexity", "qnn.tasks"
BINARY_STEM = "weight_sharing_model_1_of_1.serialized"  # qnn-context-binary-generator appends ".bin"
SHARED_BIN = BINARY_STEM + ".bin"  # the shipped weight-shared binary, whichever provider built it


def shared_bin(part: int, parts: int) -> str:
    """The weight-shared binary of part `part` (1-based) of `parts`, named as the SDK's tool names it."""
    return f"weight_sharing_model_{part}_of_{parts}.serialized.bin"


class QnnStage(Stage):
    runtimes = (RUNTIME,)


class GraphStage(QnnStage):
    """A Qualcomm stage that builds or rewrites the adapted ONNX graphs."""

    tools = ("python", "torch", "transformers", "onnx", "onnxruntime", "numpy")
    resource = "heavy"


def calibration_device(choice: str) -> str:
    """`auto` settled at plan time (CUDA and CPU calibration give different bytes, so the device
    enters the key): CUDA when torch is a CUDA build and an NVIDIA driver is loaded. Torch is not
    imported: planning stays cheap."""
    if choice != "auto":
        return choice
    try:
        cuda_build = "+cpu" not in metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "cpu"
    return "cuda" if cuda_build and Path("/dev/nvidiactl").exists() else "cpu"


def ar_variant(ar: int) -> str:
    return f"ar{ar}"


def export_nodes(recipe: Recipe) -> list[str]:
    """qnn.export@ar<N> for each distinct AR length, in the recipe's order."""
    return [node_id(EXPORT, ar_variant(a)) for a in dict.fromkeys(recipe.spec.ar_lengths)]


def provider(recipe: Recipe) -> str:
    """Who compiles the shipped binary: the recipe's choice, or qairt when the SDK is here."""
    from pipeline.qnn import qairt

    chosen = recipe.stage_params(COMPILE)["provider"]
    return ("qairt" if qairt.available() else "ort-qnn") if chosen == "auto" else chosen


def soc_params(recipe: Recipe) -> dict[str, Any]:
    """The target's SoC as the compile and Genie stages key on it; an error without one."""
    soc = recipe.target.soc
    if soc is None:
        raise KilnError(f"{recipe.where('target')}: target {recipe.target.name!r} has no `soc` (soc_model, dsp_arch): "
                        f"{COMPILE} needs one")
    return {"soc": soc.name, "soc_model": soc.soc_model, "htp_arch": int(soc.dsp_arch.removeprefix("v"))}


def split_count(recipe: Recipe) -> int:
    """How many parts the model is compiled in: the recipe's `num_splits`, or with `auto` the fewest
    parts whose estimated HTP allocation (weights on their grids + KV cache at the context length)
    stays within `max_part_mb` (docs/qualcomm.md#model-splitting)."""
    from pipeline.recipe.size import htp_part_bytes, planned_layers

    own = recipe.stage_params(COMPILE)
    layers = planned_layers(recipe)
    if own["num_splits"] != "auto":
        parts = own["num_splits"]
        if layers is not None and parts > layers:
            raise KilnError(f"{recipe.where('stages', COMPILE, 'num_splits')}: stages.{COMPILE}.num_splits: {parts} parts "
                            f"for {layers} decoder layers; at most one part a layer")
    else:
        parts, most, limit = 1, min(layers or 1, 64), own["max_part_mb"] << 20
        while parts < most and max(htp_part_bytes(recipe, parts) or [0]) > limit:
            parts += 1
    if parts > 1 and provider(recipe) == "qairt":
        raise KilnError(f"{recipe.where('stages', COMPILE, 'num_splits')}: stages.{COMPILE}.num_splits: {parts} parts are "
                        f"compiled by provider ort-qnn only (the qairt flow converts whole graphs); set provider: ort-qnn")
    return parts


def genie_params(recipe: Recipe) -> dict[str, Any]:
    """stages.qnn.genie_config plus what the rendered configs take from the recipe."""
    from pipeline.qnn.genie import template_dir

    own = recipe.stage_params(GENIE_CONFIG)
    template_dir(own["sdk"])
    soc = soc_params(recipe)
    parts = split_count(recipe)
    return {**own, "model": recipe.model.name, "context_length": recipe.spec.context_length,
            "soc_model": soc["soc_model"], "dsp_arch": f"v{soc['htp_arch']}",
            "ctx_bins": [f"models/{shared_bin(i, parts)}" for i in range(1, parts + 1)]}  # where qnn.package puts them


def genie_sources(recipe: Recipe) -> dict[str, Path]:
    """The Genie templates of the SDK version the recipe renders for."""
    from pipeline.qnn.genie import GENIE_TEMPLATES

    return {"templates": GENIE_TEMPLATES / recipe.stage_params(GENIE_CONFIG)["sdk"]}
