"""kuiper.export: the model stage's HF checkpoint → KuiperLLama's int8 group-quantized file
(pipeline/kuiper/format.py has the layout), plus kuiper.json (header values, and what the format does not
carry: RoPE theta, norm epsilon, special tokens) and the tokenizer files.

The scheme must be 8-bit symmetric per-block: its block size is the header's group_size (64 in
KuiperLLama's exporter). max_seq_len is the recipe's context_length (the runtime sizes its KV cache by it).
"""
from __future__ import annotations

import json
import shutil
from typing import TYPE_CHECKING, Any

from pipeline.engine.errors import RecipeError
from pipeline.engine.stage import NoParams, Stage, StageContext
from pipeline.kuiper.common import EXPORT, MODEL_FILE, RUNTIME, TOKENIZER_FILES

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe



def load_tensors(model_dir: Any) -> dict[str, Any]:
    """Every tensor of the checkpoint's safetensors files, as lazily loaded float32 numpy arrays."""
    from safetensors import safe_open

    handles = [safe_open(str(f), framework="pt") for f in sorted(model_dir.glob("*.safetensors"))]
    where = {name: h for h in handles for name in h.keys()}
    return {name: (lambda n=name: where[n].get_tensor(n).float().numpy()) for name in where}


class KuiperExport(Stage):
    """KuiperLLama's int8 export (header + q8 weights/scales + fp32 tensors)."""

    name = EXPORT
    version = 1
    Params = NoParams
    tools = ("python", "numpy", "safetensors", "torch")
    resource = "heavy"
    runtimes = (RUNTIME,)

    requires = ("model",)

    @classmethod
    def params(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        w = recipe.scheme.weights
        if (w.bits, w.granularity, w.symmetric) != (8, "per-block", True):
            raise RecipeError(f"{recipe.where('scheme')}: scheme {recipe.scheme.name!r}: the Kuiper format stores "
                              f"symmetric int8 weights in groups: weights need bits 8, granularity per-block, "
                              f"symmetric true (got bits {w.bits}, {w.granularity}, symmetric {w.symmetric})")
        return {"group_size": w.block_size, "max_seq_len": recipe.spec.context_length}

    @classmethod
    def ships(cls, recipe: Recipe, variant: str = "") -> str | None:
        return "."

    def run(self, ctx: StageContext) -> None:
        import numpy as np

        from pipeline.kuiper.format import header_for, write_model

        p, model_dir = ctx.params, ctx.inputs["model"]
        config = json.loads((model_dir / "config.json").read_text())
        tensors = load_tensors(model_dir)
        embed = tensors["model.embed_tokens.weight"]()
        shared = "lm_head.weight" not in tensors or bool(np.array_equal(embed, tensors["lm_head.weight"]()))
        header = header_for(config, p["group_size"], p["max_seq_len"], shared)
        with open(ctx.out / MODEL_FILE, "wb") as f:
            worst = write_model(f, header, lambda name: embed if name == "model.embed_tokens.weight" else tensors[name]())
        rope = config.get("rope_parameters") or {}
        meta = {"file": MODEL_FILE, "format": "KuiperLLama export.py --version 3",
                "header": {**header.__dict__, "shared_classifier": header.shared_classifier},
                "rope_theta": rope.get("rope_theta", config.get("rope_theta", 10000.0)),
                "rms_norm_eps": config["rms_norm_eps"], "bos_token_id": config.get("bos_token_id"),
                "eos_token_id": config.get("eos_token_id"), "max_quantization_error": worst,
                "size_bytes": (ctx.out / MODEL_FILE).stat().st_size}
        (ctx.out / "kuiper.json").write_text(json.dumps(meta, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (model_dir / name).exists():
                shutil.copyfile(model_dir / name, ctx.out / name)
        ctx.log.info(f"{MODEL_FILE}: {meta['size_bytes'] / 1e6:.1f} MB, header {header}, "
                     f"largest group quantization error {worst:.5f}")
