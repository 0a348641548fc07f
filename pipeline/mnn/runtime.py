"""MNN's LLM runtime from Python (pymnn's MNN.llm): config.json rendering, loading an export,
greedy decoding with timings. Shared by mnn.config and mnn.verify."""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from pipeline.engine.errors import KilnError, RecipeError
from pipeline.engine.fields import DeviceDir
from pipeline.engine.stage import Strict
from pipeline.engine.templating import render

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe

RUNTIME = "mnn"  # the target runtime every stage here serves
EXPORT, CONFIG, VERIFY, PERPLEXITY, TASKS = "mnn.export", "mnn.config", "mnn.verify", "mnn.perplexity", "mnn.tasks"
# mnn.config's settings that change the numbers (mnn.verify and mnn.perplexity key on them)
NUMERIC_SETTINGS = ("precision", "memory", "quant_qkv")
CONFIG_TEMPLATE = "mnn/config.json.j2"
# Where config.json points, relative to its own directory (MNN's base_dir): mnn.export's files.
EXPORT_FILES = {"llm_model": "llm.mnn", "llm_weight": "llm.mnn.weight", "tokenizer_file": "tokenizer.mtok"}



# config.json's settings: mnn.config's params (its recipe section), and the greedy config mnn.verify runs with.
class MnnSampler(Strict):
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


class MnnConfigParams(Strict):
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
    tmp_path: DeviceDir | Literal[""] = Field(
        "", description="Directory on the device for mmap files; required with use_mmap or kvcache_mmap.")
    sampler: MnnSampler = Field(default_factory=MnnSampler, description="Sampling settings.")

    @model_validator(mode="after")
    def _tmp(self) -> MnnConfigParams:
        if (self.use_mmap or self.kvcache_mmap) and not self.tmp_path:
            raise ValueError("use_mmap / kvcache_mmap need tmp_path: a writable directory on the device")
        return self

def render_config(runtime: dict[str, Any]) -> dict[str, Any]:
    """config.json from the runtime settings (mnn.config's params), parsed back to check it is JSON."""
    text = render(CONFIG_TEMPLATE, files=EXPORT_FILES, **runtime)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise KilnError(f"{CONFIG_TEMPLATE} rendered invalid JSON: {e}") from None


@contextmanager
def loaded(export_dir: Path, config: dict[str, Any], into: Path) -> Iterator[MnnLlm]:
    """The export loaded by MNN's engine with `config`: its files (linked) and config.json laid
    out in `into` as on the device, removed again afterwards."""
    from pipeline.engine.materialize import link_or_copy

    into.mkdir(parents=True)
    try:
        for name in (*EXPORT_FILES.values(), "llm_config.json"):
            link_or_copy(export_dir / name, into / name)
        (into / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        yield MnnLlm(into / "config.json")
    finally:
        shutil.rmtree(into)


def host_config(config: dict[str, Any], threads: int) -> dict[str, Any]:
    """`config` as this machine runs it: CPU backend, no mmap (no device tmp_path here)."""
    kept = {k: v for k, v in config.items() if k != "tmp_path"}
    return {**kept, "backend_type": "cpu", "thread_num": threads, "use_mmap": False, "kvcache_mmap": False}


def numeric_settings(recipe: Recipe) -> dict[str, Any]:
    """mnn.config's settings that change the numbers: what the stages running the engine key on."""
    runtime = recipe.stage_params(CONFIG)
    return {k: runtime[k] for k in NUMERIC_SETTINGS}


def greedy_host_config(numeric: dict[str, Any]) -> dict[str, Any]:
    """The config a host check loads: the numeric settings, greedy sampling, this machine's threads."""
    from pipeline.engine.proc import threads

    greedy = MnnConfigParams(sampler={"type": "greedy"}).model_dump(mode="json")
    return host_config(render_config({**greedy, **numeric}), int(threads()))


@dataclass
class Greedy:
    tokens: list[int]
    prompt_logits: Any  # numpy array: the last prompt position's logits
    prefill_s: float
    decode_s: float


class MnnLlm:
    """An export loaded by MNN's LLM engine from a directory holding config.json and its files."""

    def __init__(self, config: Path) -> None:
        import MNN.llm as llm

        for key, name in EXPORT_FILES.items():
            if not (config.parent / name).is_file():
                raise KilnError(f"{config}: {key} {name} is missing beside it")
        self.llm = llm.create(str(config))
        self.llm.load()

    def encode(self, text: str) -> list[int]:
        return list(self.llm.tokenizer_encode(text))

    def logits(self, ids: list[int]) -> Any:
        import numpy as np

        return np.array(self.llm.forward(ids).read(), dtype=np.float32).reshape(-1)

    def greedy(self, ids: list[int], n: int) -> Greedy:
        """Prefill `ids`, then n-1 single-token steps on the KV cache (n tokens, argmax)."""
        self.llm.reset()
        t0 = time.perf_counter()
        last = self.logits(ids)
        t1 = time.perf_counter()
        tokens = [int(last.argmax())]
        for _ in range(n - 1):
            tokens.append(int(self.logits(tokens[-1:]).argmax()))
        t2 = time.perf_counter()
        self.llm.reset()
        return Greedy(tokens, last, t1 - t0, t2 - t1)

    def teacher_forced(self, ids: list[int], first: int, n: int) -> Any:
        """Logits [n, vocab] at positions first .. first+n-1 of `ids`: the prefix up to `first` in
        one prefill, then the known next tokens one by one on the KV cache, as decoding runs."""
        import numpy as np

        self.llm.reset()
        rows = [self.logits(ids[:first + 1])]
        rows += [self.logits([t]) for t in ids[first + 1:first + n]]
        self.llm.reset()
        return np.stack(rows)

    def response(self, prompt: str, max_new_tokens: int) -> str:
        """The chat answer (MNN applies the export's chat template), sampled as config.json says:
        the sampler is built at load, so set_config cannot switch it (a greedy check needs
        `sampler_type: greedy` in the config it loads)."""
        self.llm.reset()
        self.llm.set_config({"max_new_tokens": max_new_tokens})
        text = self.llm.response(prompt)
        self.llm.reset()
        return text


def export_params(recipe: Recipe) -> dict[str, Any]:
    """mnn.export's params: its recipe section and the scheme as llmexport's flags take it."""
    w, s = recipe.scheme.weights, recipe.scheme
    own = recipe.stage_params(EXPORT)
    problems = []
    if w.bits not in (4, 8):
        problems.append(f"weights.bits {w.bits} (llmexport quantizes to 4 or 8 bits)")
    if w.granularity == "per-tensor":
        problems.append("weights.granularity per-tensor (llmexport: per-channel or per-block)")
    if s.algorithm not in ("none", "rtn"):
        problems.append(f"algorithm {s.algorithm} (Kiln drives llmexport's round-to-nearest quantization)")
    if own["embed_bit"] not in (16, 8, 4):
        problems.append(f"stages.mnn.export.embed_bit {own['embed_bit']} (16, 8 or 4)")
    if problems:
        raise RecipeError(f"{recipe.where('scheme')}: scheme {s.name!r} for MNN: " + "; ".join(problems))
    return {**own, "model": recipe.model.name, "quant_bit": w.bits,
            "quant_block": w.block_size if w.granularity == "per-block" else 0, "sym": w.symmetric}
