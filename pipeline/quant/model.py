"""Weight fake-quantization of a HF causal LM, layer by layer, with calibration inputs.

Which weights: every Linear of the decoder layers and the LM head (tied embeddings are
quantized with it). Their grid comes from the scheme, the first matching override
first; the algorithm (rtn / mse / seqmse / gptq) from the scheme.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from . import algorithms
from .grid import Grid, quantize

if TYPE_CHECKING:
    from .qdq import QuantParam


# Norm gammas without an override: HTP wants them at 16 bits (FACTS.md), never at the
# scheme's 4-bit Conv default.
NORM_DEFAULT = {"bits": 16, "granularity": "per-tensor", "symmetric": True}


def grid_for(name: str, scheme: dict[str, Any], ndim: int = 2) -> Grid | None:
    """The grid of weight `name` (first matching override first); None keeps it float (32)."""
    spec = scheme["weights"] if ndim > 1 else NORM_DEFAULT
    for rule in scheme.get("overrides", []):
        if rule.get("weights") and re.search(rule["match"], name):
            spec = rule["weights"]
            break
    if spec["bits"] >= 32:
        return None
    return Grid(spec["bits"], spec["granularity"], spec.get("block_size"), spec.get("symmetric", True))


def quantizable(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (".layers." in name or name.endswith("lm_head")):
            yield name, module


def capture_inputs(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inputs seen by each quantizable Linear on the calibration batches, one row per token."""
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
    return {name: torch.cat(chunks) for name, chunks in seen.items()}


def sample_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """A fixed random sample of at most `rows` rows."""
    gen = torch.Generator().manual_seed(0)
    return x[torch.randperm(x.shape[0], generator=gen)[:rows].to(x.device)] if x.shape[0] > rows else x


def sqnr_db(w: torch.Tensor, wq: torch.Tensor) -> float:
    noise = (w - wq).pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * math.log10(w.pow(2).sum().item() / noise)


def quantize_weights(model: torch.nn.Module, scheme: dict[str, Any], algorithm: str,
                     inputs: dict[str, torch.Tensor], device: str = "cpu", seqmse_rows: int = 1024) -> list[dict[str, Any]]:
    """Replace weights by their fake-quantized values in place; return one report row per weight.
    The algorithm runs on `device` (calibration inputs are expected there already). GPTQ uses
    every calibration row (its Hessian needs far more rows than input channels: 256 rows made it
    worse than round-to-nearest on SmolLM2); SeqMSE, whose cost grows with rows, a sample."""
    rows = []
    done: set[int] = set()
    for name, module in quantizable(model):
        grid = grid_for(name, scheme)
        if grid is None or id(module.weight) in done:
            continue
        done.add(id(module.weight))
        w = module.weight.data.float().to(device)
        if algorithm == "gptq":
            wq, scale, zero = algorithms.gptq(w, grid, inputs[name].float())
        elif algorithm == "seqmse":
            wq, scale, zero = algorithms.seqmse(w, grid, sample_rows(inputs[name], seqmse_rows).float())
        elif algorithm == "mse":
            wq, scale, zero = algorithms.mse(w, grid)
        else:
            wq, scale, zero = algorithms.rtn(w, grid)
        w, wq, scale, zero = w.cpu(), wq.cpu(), scale.cpu(), zero.cpu()
        module.weight.data = wq.to(module.weight.dtype)
        rows.append({"name": f"{name}.weight", "bits": grid.bits, "granularity": grid.granularity,
                     "block_size": grid.block_size, "symmetric": grid.symmetric, "sqnr_db": round(sqnr_db(w, wq), 3),
                     "grid": grid, "scale": scale, "zero": zero})
    return rows


def quant_param(name: str, w: torch.Tensor, grid: Grid, scale: torch.Tensor, zero: torch.Tensor,
                shape: tuple[int, ...]) -> "QuantParam":
    """Integer codes and DequantizeLinear layout of weight `w` (HF layout) for an ONNX initializer
    of `shape` (a 1x1 Conv's [out, in, 1, 1], an embedding's [vocab, hidden], a norm's [hidden])."""
    from .encodings import encoding_from_grid
    from .qdq import QuantParam

    codes = quantize(grid.groups(w.reshape(w.shape[0], -1) if w.ndim > 1 else w[None]), scale, zero, grid)
    if grid.granularity == "per-tensor":
        axis, onnx_scale = None, scale.reshape(())
    elif grid.granularity == "per-channel":
        axis, onnx_scale = 0, scale.reshape(-1)
    else:
        axis, onnx_scale = 1, scale.reshape(scale.shape[0], scale.shape[1], *[1] * (len(shape) - 2))
    encoding = encoding_from_grid(name, grid.bits, grid.symmetric, scale.flatten().tolist(), zero.flatten().tolist(),
                                  grid.qmin, grid.block_size if axis == 1 else None)
    return QuantParam(encoding, codes.reshape(shape).to(torch.int32).numpy(), onnx_scale.numpy(),
                      zero.reshape(onnx_scale.shape).to(torch.int32).numpy(), axis,
                      grid.block_size if axis == 1 else None)


def onnx_params(model: torch.nn.Module, scheme: dict[str, Any], rows: list[dict[str, Any]],
                names: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> dict[str, "QuantParam"]:
    """QuantParams for the ONNX initializers `names` maps to HF parameters: the algorithm's grid for
    the weights it quantized (tied ones included), round-to-nearest on the scheme's grid for the rest."""
    state = dict(model.named_parameters(remove_duplicate=False))
    done = {state[r["name"]].data_ptr(): r for r in rows}
    params = {}
    for onnx_name, hf_name in names.items():
        if onnx_name not in shapes or hf_name not in state:
            continue
        w = state[hf_name].detach().float()
        row = done.get(state[hf_name].data_ptr())
        if row is not None:
            grid, scale, zero = row["grid"], row["scale"], row["zero"]
        else:
            grid = grid_for(hf_name, scheme, w.ndim)
            if grid is None:
                continue
            _, scale, zero = algorithms.rtn(w.reshape(w.shape[0], -1) if w.ndim > 1 else w[None], grid)
        params[onnx_name] = quant_param(onnx_name, w, grid, scale, zero, shapes[onnx_name])
    return params
