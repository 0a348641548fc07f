"""mnn.config: config.json, MNN's runtime settings for the export, rendered from
templates/mnn/config.json.j2 (seed 003's keys).

Backend, threads, precision, memory policy, generation length, KV reuse and quantization, mmap and
the sampler are this stage's params: a tweak reruns this stage and the bundle only. The rendered
file is checked by loading the export with it in MNN's engine (host CPU) before it is published.
The export's llm_config.json (the model's description: hidden size, layers, chat template, tied
embedding layout) is mnn.export's and is shipped as exported; MNN merges it under config.json.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..stage import Stage, StageContext
from ..templating import ShipsTemplates
from .mnn_export import MnnExport

if TYPE_CHECKING:
    from ..recipe import Recipe


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MnnSampler(_Strict):
    type: Literal["greedy", "temperature", "topK", "topP", "minP", "tfs", "typical", "penalty", "mixed"] = Field(
        "mixed", description="MNN sampler_type; `mixed` chains MNN's default samplers.")
    temperature: float = Field(0.8, gt=0, description="Sampling temperature.")
    top_k: int = Field(40, ge=1, description="Keep the k most likely tokens.")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass.")
    min_p: float = Field(0.05, ge=0, le=1, description="Drop tokens below this fraction of the top probability.")
    tfs_z: float = Field(1.0, gt=0, le=1, description="Tail-free sampling z (1 = off).")
    typical: float = Field(0.95, gt=0, le=1, description="Locally typical sampling mass.")
    repetition_penalty: float = Field(1.0, gt=0, description="Repetition penalty (1 = off).")
    presence_penalty: float = Field(0.0, description="Presence penalty.")
    frequency_penalty: float = Field(0.0, description="Frequency penalty.")
    penalty_window: int = Field(0, ge=0, description="Tokens the penalties look back over (0 = all).")
    n_gram: int = Field(8, ge=1, description="n-gram length of the repetition penalty.")
    ngram_factor: float = Field(1.0, ge=0, description="Extra penalty for repeated n-grams.")


class MnnConfigParams(_Strict):
    backend_type: Literal["cpu", "opencl", "vulkan", "metal", "cuda", "npu"] = Field(
        "cpu", description="MNN backend on the device.")
    thread_num: int = Field(4, ge=1, description="CPU threads (OpenCL: MNN's GPU mode number, e.g. 68).")
    precision: Literal["low", "normal", "high"] = Field("low", description="`low`: fp16 where the CPU has it.")
    memory: Literal["low", "normal", "high"] = Field("low", description="`low`: runtime quantization of activations "
                                                     "for quantized weights (needs MNN_LOW_MEMORY builds).")
    max_new_tokens: int = Field(512, ge=1, description="Most tokens generated per answer.")
    reuse_kv: bool = Field(False, description="Keep the KV cache across turns of a conversation.")
    quant_qkv: Literal[0, 1, 2, 3, 4] = Field(0, description="CPU attention: 0 none, 1 int8 keys, 2 fp8 values, "
                                              "3 both, 4 both plus int8 queries and an int8 Q·K.")
    use_mmap: bool = Field(False, description="mmap the weights (spill to tmp_path under memory pressure; phones: true).")
    kvcache_mmap: bool = Field(False, description="mmap the KV cache (spill to tmp_path).")
    tmp_path: str = Field("", description="Directory on the device for mmap files; required with use_mmap or kvcache_mmap.")
    sampler: MnnSampler = Field(default_factory=MnnSampler, description="Sampling settings.")

    @model_validator(mode="after")
    def _tmp(self) -> "MnnConfigParams":
        if (self.use_mmap or self.kvcache_mmap) and not self.tmp_path:
            raise ValueError("use_mmap / kvcache_mmap need tmp_path: a writable directory on the device")
        return self


class MnnConfig(ShipsTemplates, Stage):
    """config.json for MNN's LLM engine, checked by loading the export with it."""

    name = "mnn.config"
    version = 1
    Params = MnnConfigParams
    tools = ("python", "jinja2", "mnn")
    templates_used = ("mnn/config.json.j2",)

    @classmethod
    def applies(cls, recipe: "Recipe") -> bool:
        return MnnExport.applies(recipe)

    @classmethod
    def inputs(cls, recipe: "Recipe", variant: str = "") -> list[str]:
        return [MnnExport.name]

    def run(self, ctx: StageContext) -> None:
        from ..mnn import host_config, loaded, render_config

        p = ctx.params
        config = render_config(p)
        (ctx.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        with loaded(ctx.inputs[MnnExport.name], host_config(config, 1), ctx.out / "_check") as llm:
            n = len(llm.encode("Hello"))
        ctx.log.info(f"config.json: {p['backend_type']}, {p['thread_num']} threads, precision {p['precision']}, "
                     f"memory {p['memory']}, sampler {p['sampler']['type']}; MNN loaded the export with it "
                     f"(host CPU; tokenizer: {n} tokens for 'Hello')")
