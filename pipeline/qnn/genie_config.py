"""qnn.genie_config: the Genie configs the phone runs with, rendered from templates/genie/<sdk>/.

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

from pydantic import Field

from pipeline.engine.fields import Token
from pipeline.engine.stage import StageContext, Strict
from pipeline.qnn.common import GENIE_CONFIG, QnnStage, genie_params, genie_sources

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe

PERF_PROFILES = Literal["low_balanced", "balanced", "default", "high_performance", "sustained_high_performance",
                        "burst", "low_power_saver", "power_saver", "high_power_saver", "extreme_power_saver"]


class Sampler(Strict):
    seed: int = Field(42, description="Sampler seed.")
    temp: float = Field(0.8, gt=0, description="Sampling temperature.")
    top_k: int = Field(40, ge=1, description="Keep the k most likely tokens.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass.")


class Core(Strict):
    core_id: int = Field(0, ge=0, description="HTP core.")
    perf_profile: PERF_PROFILES = Field("burst", description="Its performance profile.")
    rpc_control_latency: int = Field(100, ge=0, description="FastRPC control latency (µs).")


class QnnGenieConfigParams(Strict):
    sdk: Token = Field("2.51", description="QAIRT SDK whose Genie config schema to render for (a folder of templates/genie/).")
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


class QnnGenieConfig(QnnStage):
    """Genie dialog + HTP backend extension configs (checked by libGenie and a JSON Schema)."""

    name = GENIE_CONFIG
    version = 1
    Params = QnnGenieConfigParams
    tools = ("python", "jinja2", "jsonschema", "onnxruntime-qnn")

    requires = ("model",)

    @classmethod
    def params(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        return genie_params(recipe)

    @classmethod
    def sources(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        return genie_sources(recipe)

    @classmethod
    def ships(cls, recipe: Recipe, variant: str = "") -> str | None:
        return "."

    def run(self, ctx: StageContext) -> None:
        from pipeline.qnn.genie import (
            api_version,
            check_dialog_config,
            check_ext_config,
            config_name,
            genie_values,
            render_configs,
        )

        p = ctx.params
        values = genie_values(p, ctx.inputs["model"], p["ctx_bins"], weight_sharing=True)
        dialog, ext = render_configs(p["sdk"], values)
        check_ext_config(p["sdk"], ext)
        check_dialog_config(dialog, config_name(p["model"]))
        (ctx.out / config_name(p["model"])).write_text(json.dumps(dialog, indent=2) + "\n")
        (ctx.out / "htp_backend_ext_config.json").write_text(json.dumps(ext, indent=2) + "\n")
        ctx.log.info(f"{config_name(p['model'])}: accepted by libGenie {api_version()}; "
                     f"htp_backend_ext_config.json: valid (soc_model {p['soc_model']}, {p['dsp_arch']})")

