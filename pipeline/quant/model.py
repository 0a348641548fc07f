"""Weight fake-quantization of a HF causal LM, layer by layer, with calibration inputs.

Which weights: every Linear of the decoder layers and the LM head (tied embeddings are
quantized with it). Their grid comes from the scheme, the first matching override
first; the algorithm (rtn / mse / seqmse / gptq) from the scheme.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import torch

from . import algorithms
from .grid import Grid


def grid_for(name: str, scheme: dict[str, Any]) -> Grid | None:
    """The grid of weight `name`; None keeps it float (bits 16/32)."""
    spec = scheme["weights"]
    for rule in scheme.get("overrides", []):
        if rule.get("weights") and re.search(rule["match"], name):
            spec = rule["weights"]
            break
    if spec["bits"] >= 16:
        return None
    return Grid(spec["bits"], spec["granularity"], spec.get("block_size"), spec.get("symmetric", True))


def quantizable(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (".layers." in name or name.endswith("lm_head")):
            yield name, module


def capture_inputs(model: torch.nn.Module, batches: list[torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """Inputs seen by each quantizable Linear on the calibration batches (a row sample of at most `rows`)."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: seen.setdefault(n, []).append(args[0].reshape(-1, args[0].shape[-1]).detach()))
             for n, m in quantizable(model)]
    try:
        with torch.no_grad():
            for ids in batches:
                model(ids)
    finally:
        for h in hooks:
            h.remove()
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, chunks in seen.items():
        x = torch.cat(chunks)
        out[name] = x[torch.randperm(x.shape[0], generator=gen)[:rows]] if x.shape[0] > rows else x
    return out


def sqnr_db(w: torch.Tensor, wq: torch.Tensor) -> float:
    noise = (w - wq).pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * math.log10(w.pow(2).sum().item() / noise)


def quantize_weights(model: torch.nn.Module, scheme: dict[str, Any], algorithm: str,
                     inputs: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Replace weights by their fake-quantized values in place; return one report row per weight."""
    rows = []
    done: set[int] = set()
    for name, module in quantizable(model):
        grid = grid_for(name, scheme)
        if grid is None or id(module.weight) in done:
            continue
        done.add(id(module.weight))
        w = module.weight.data.float()
        if algorithm in ("seqmse", "gptq"):
            wq, scale, zero = getattr(algorithms, algorithm)(w, grid, inputs[name].float())
        elif algorithm == "mse":
            wq, scale, zero = algorithms.mse(w, grid)
        else:
            wq, scale, zero = algorithms.rtn(w, grid)
        module.weight.data = wq.to(module.weight.dtype)
        rows.append({"name": f"{name}.weight", "bits": grid.bits, "granularity": grid.granularity,
                     "block_size": grid.block_size, "symmetric": grid.symmetric, "sqnr_db": round(sqnr_db(w, wq), 3),
                     "scale": scale.flatten().tolist(), "offset": (-zero).flatten().int().tolist()})
    return rows


def perplexity(model: torch.nn.Module, ids: list[int], ctx: int, windows: int) -> float:
    """exp(mean NLL) over non-overlapping windows of `ctx` tokens (the first `windows` of them)."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(min(windows, len(ids) // ctx)):
            chunk = torch.tensor([ids[w * ctx:(w + 1) * ctx]])
            logits = model(chunk).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
            count += ctx - 1
    return math.exp(nll / count)
