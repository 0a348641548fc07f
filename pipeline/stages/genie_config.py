"""genie.config: the Genie configs the phone runs with, rendered from templates/genie/<sdk>/.

`htp-model-config-<model>.json` (dialog: context, sampler, tokenizer, engine/backend/model with the
weight-shared binary of qnn.compile, RoPE by model family) and `htp_backend_ext_config.json`
(device soc_model/dsp_arch, cores, memory, weight sharing). The dialog config must pass Genie's
own schema (libGenie's GenieDialogConfig_createFromJson), the extension config the JSON Schema
kept with its template. Sampler, threads and CPU mask are this stage's params: tweaking them
reruns this stage and the bundle only.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..stage import Stage, StageContext
from .qnn_compile import SHARED_BIN, QnnCompile

if TYPE_CHECKING:
    from ..recipe import Recipe

PERF_PROFILES = Literal["low_balanced", "balanced", "default", "high_performance", "sustained_high_performance",
                        "burst", "low_power_saver", "power_saver", "high_power_saver", "extreme_power_saver"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sampler(_Strict):
    seed: int = Field(42, description="Sampler seed.")
    temp: float = Field(0.8, gt=0, description="Sampling temperature.")
    top_k: int = Field(40, ge=1, description="Keep the k most likely tokens.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass.")


class Core(_Strict):
    core_id: int = Field(0, ge=0, description="HTP core.")
    perf_profile: PERF_PROFILES = Field("burst", description="Its performance profile.")
    rpc_control_latency: int = Field(100, ge=0, description="FastRPC control latency (µs).")


class GenieConfigParams(_Strict):
    sdk: str = Field("2.51", description="QAIRT SDK whose Genie config schema to render for (a folder of templates/genie/).")
    sampler: Sampler = Field(default_factory=Sampler, description="Genie's sampler.")
    n_threads: int = Field(3, ge=1, description="CPU threads Genie uses (engine.n-threads).")
    cpu_mask: str = Field("0xe0", pattern=r"^0x[0-9a-fA-F]+$", description="CPU affinity mask of those threads.")
    poll: bool = Field(True, description="Poll for HTP completion instead of waiting on interrupts.")
    use_mmap: bool = Field(True, description="mmap the context binaries.")
    spill_fill_bufsize: int = Field(0, ge=0, description="Spill-fill buffer bytes (0 = none).")
    mmap_budget: int = Field(0, ge=0, description="mmap budget in MB (0 = unlimited).")
    allow_async_init: bool = Field(False, description="Load binaries asynchronously.")
    cores: list[Core] = Field(default_factory=lambda: [Core()], description="HTP cores and their settings.")
    mem_type: Literal["shared_buffer", "raw"] = Field("shared_buffer", description="HTP I/O memory (ext config).")


def config_name(model: str) -> str:
    return f"htp-model-config-{model.lower()}.json"


class GenieConfig(Stage):
    """Genie dialog + HTP backend extension configs (checked by libGenie and a JSON Schema)."""

    name = "genie.config"
    version = 1
    Params = GenieConfigParams
    tools = ("python", "jinja2", "jsonschema", "onnxruntime-qnn")

    @classmethod
    def applies(cls, recipe: "Recipe") -> bool:
        return QnnCompile.applies(recipe)

    @classmethod
    def inputs(cls, recipe: "Recipe", variant: str = "") -> list[str]:
        return ["model"]

    @classmethod
    def params(cls, recipe: "Recipe", variant: str = "") -> dict[str, Any]:
        from ..genie import template_dir

        own = recipe.stage_params(cls.name)
        template_dir(own["sdk"])
        soc = QnnCompile.params(recipe)
        return {**own, "model": recipe.model.name, "context_length": recipe.spec.context_length,
                "soc_model": soc["soc_model"], "dsp_arch": f"v{soc['htp_arch']}",
                "ctx_bins": [f"models/{SHARED_BIN}"]}  # where genie.package puts it

    @classmethod
    def sources(cls, recipe: "Recipe", variant: str = "") -> dict[str, Any]:
        from ..genie import GENIE_TEMPLATES

        return {"templates": GENIE_TEMPLATES / recipe.stage_params(cls.name)["sdk"]}

    @classmethod
    def ships(cls, recipe: "Recipe", variant: str = "") -> str | None:
        return "."

    def run(self, ctx: StageContext) -> None:
        from ..genie import api_version, check_dialog_config, check_ext_config, render_configs

        p = ctx.params
        values = genie_values(p, ctx.inputs["model"], p["ctx_bins"], weight_sharing=True)
        dialog, ext = render_configs(p["sdk"], values)
        check_ext_config(p["sdk"], ext)
        check_dialog_config(dialog, config_name(p["model"]))
        (ctx.out / config_name(p["model"])).write_text(json.dumps(dialog, indent=2) + "\n")
        (ctx.out / "htp_backend_ext_config.json").write_text(json.dumps(ext, indent=2) + "\n")
        ctx.log.info(f"{config_name(p['model'])}: accepted by libGenie {api_version()}; "
                     f"htp_backend_ext_config.json: valid (soc_model {p['soc_model']}, {p['dsp_arch']})")


def genie_values(p: dict[str, Any], model_dir: Any, ctx_bins: list[str], weight_sharing: bool) -> dict[str, Any]:
    """Template values: the stage's params, the model's, and which binaries the dialog loads."""
    from ..genie import model_values

    return {**model_values(model_dir, p["context_length"]), "sampler": p["sampler"], "tokenizer_path": "tokenizer.json",
            "n_threads": p["n_threads"], "use_mmap": p["use_mmap"], "spill_fill_bufsize": p["spill_fill_bufsize"],
            "mmap_budget": p["mmap_budget"], "poll": p["poll"], "cpu_mask": p["cpu_mask"],
            "allow_async_init": p["allow_async_init"], "ext_config_path": "htp_backend_ext_config.json",
            "ctx_bins": ctx_bins, "soc_model": p["soc_model"], "dsp_arch": p["dsp_arch"], "cores": p["cores"],
            "mem_type": p["mem_type"], "weight_sharing": weight_sharing}
