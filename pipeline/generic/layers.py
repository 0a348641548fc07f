"""A Hugging Face causal LM run one decoder layer at a time.

`layer0_inputs` captures what decoder layer 0 is called with (hidden states and keyword
arguments: RoPE cos/sin, mask, positions), so a caller can then run the layers one by one:
calibration (qnn.quant) and the float reference of the perplexity protocol (`streamed_logits`),
which materializes one layer's weights at a time from the safetensors so a model bigger than
memory in float32 (8B: 32 GB) is scored in about the size of its embedding and LM head.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class _Reached(Exception):
    """Stops a forward pass once decoder layer 0's inputs are captured."""


def _to(obj: Any, device: str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def layer0_inputs(model: torch.nn.Module, batches: list[torch.Tensor], device: str) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """(hidden states, keyword arguments: RoPE cos/sin, mask, positions) entering decoder layer 0, per batch."""
    seen: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        seen.append(_to((hidden, kwargs), device))
        raise _Reached

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(ids, use_cache=False)
                except _Reached:
                    pass
    finally:
        handle.remove()
    return seen


def layer_output(out: Any) -> torch.Tensor:
    """A decoder layer's hidden states, whether it returns them alone or first in a tuple."""
    return out[0] if isinstance(out, tuple) else out


class SafetensorsWeights:
    """Tensors of a HF model directory by name, read one at a time (single file or sharded)."""

    def __init__(self, model_dir: Path) -> None:
        from safetensors import safe_open

        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        self._open = [safe_open(str(model_dir / f), "pt") for f in files]
        self._where = {name: f for f in self._open for name in f.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name).float()

    def materialize(self, module: torch.nn.Module, prefix: str, fallback: dict[str, str] | None = None) -> None:
        """Give a meta-device `module` its float32 weights (`prefix` + parameter name; `fallback`
        maps a name absent from the files to the one it is tied to)."""
        state = {}
        for local, _ in module.named_parameters():
            name = f"{prefix}{local}"
            state[local] = self.get(name if name in self or not fallback else fallback[name])
        module.load_state_dict(state, strict=True, assign=True)


def release(module: torch.nn.Module) -> None:
    """Back to the meta device: the weights are freed."""
    module.to("meta")


def meta_model(model_dir: Path) -> torch.nn.Module:
    """The HF model of `model_dir` without weights (meta device) but with its RoPE tables, which
    are computed from the config rather than stored: what AR-step inputs need of it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model


def streamed_logits(model_dir: Path, windows: list[list[int]], positions: slice) -> Iterator[torch.Tensor]:
    """Float32 logits [len(positions), vocab] of each window (a batch of one each), the model's
    decoder layers materialized one at a time. Same numbers as the whole model's forward: the
    layers are HF's own modules, called with what HF's forward passes them."""
    model = meta_model(model_dir)
    inner = model.model
    weights = SafetensorsWeights(model_dir)
    weights.materialize(inner.embed_tokens, "model.embed_tokens.")
    states = layer0_inputs(model, [torch.tensor([w]) for w in windows], "cpu")
    release(inner.embed_tokens)
    with torch.no_grad():
        for i, layer in enumerate(inner.layers):
            weights.materialize(layer, f"model.layers.{i}.")
            states = [(layer_output(layer(h, **kwargs)), kwargs) for h, kwargs in states]
            release(layer)
        weights.materialize(inner.norm, "model.norm.")
        weights.materialize(model.lm_head, "lm_head.", {"lm_head.weight": "model.embed_tokens.weight"})
        for hidden, _ in states:
            yield model.lm_head(inner.norm(hidden[0, positions]))
