"""Weight fake-quantization of a HF causal LM, layer by layer, with calibration inputs.

Which weights: every Linear of the decoder layers and the LM head (tied embeddings are
quantized with it). Their grid comes from the scheme, the first matching override
first; the algorithm (rtn / mse / seqmse / gptq) from the scheme. The calibrated ones
(seqmse, gptq) see each Linear's inputs as H = XᵀX accumulated over every calibration token.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.engine.progress import progress
from pipeline.generic.layers import layer0_inputs, layer_output
from pipeline.qnn.quant import algorithms
from pipeline.qnn.quant.checkpoint import LayerCheckpoints
from pipeline.qnn.quant.grid import Grid, quantize

if TYPE_CHECKING:
    from pipeline.qnn.quant.qdq import QuantParam


# Norm gammas without an override: HTP wants them at 16 bits (docs/qualcomm.md#htp-numerics), never at the
# scheme's 4-bit Conv default.
NORM_DEFAULT = {"bits": 16, "granularity": "per-tensor", "symmetric": True}


def grid_for(name: str, scheme: dict[str, Any], shape: tuple[int, ...]) -> Grid | None:
    """The grid of weight `name` of `shape` (first matching override first); None keeps it float (32).

    A block size that does not divide the weight's input width (SmolLM2's 576 with blocks of 128)
    falls back to per-channel for that weight, as AIMET's blockwise quantization does: HTP's
    per-block weights need whole blocks."""
    spec = scheme["weights"] if len(shape) > 1 else NORM_DEFAULT
    for rule in scheme.get("overrides", []):
        if rule.get("weights") and re.search(rule["match"], name):
            spec = rule["weights"]
            break
    if spec["bits"] >= 32:
        return None
    granularity, block = spec["granularity"], spec.get("block_size")
    if granularity == "per-block" and (len(shape) < 2 or shape[1] % block):
        granularity, block = "per-channel", None
    return Grid(spec["bits"], granularity, block, spec.get("symmetric", True))


def quantizable(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (".layers." in name or name.endswith("lm_head")):
            yield name, module


class HessianTap:
    """While active, accumulates H = XᵀX (float64) of the inputs each of `modules` sees; an input
    shared by several (q/k/v, gate/up) is multiplied out once."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.modules = modules
        self.h: dict[str, torch.Tensor] = {}
        self._last: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def _hook(self, name: str):
        def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = args[0]
            if self._last[0] is not x:
                flat = x.reshape(-1, x.shape[-1]).float()
                self._last = (x, (flat.T @ flat).double())
            self.h[name] = self.h[name] + self._last[1] if name in self.h else self._last[1].clone()
        return hook

    def __enter__(self) -> HessianTap:
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._last = (None, None)


def sqnr_db(w: torch.Tensor, wq: torch.Tensor) -> float:
    noise = (w - wq).pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * math.log10(w.pow(2).sum().item() / noise)


# Rows of one weight calibrated together. Rows never interact in these algorithms (ranges are per
# row or per group of a row; GPTQ spreads a column's error along each row only), so a large weight
# goes in row chunks: GPTQ's float64 working copies of the whole LM head (128256 x 2048) took the
# 1B quantize stage from 11 to 18.6 GB.
CHUNK_ELEMENTS = 1 << 25  # 32M weights: 256 MB per float64 copy


def _calibrate(w: torch.Tensor, grid: Grid, algorithm: str, h: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if algorithm == "gptq":  # ranges by SeqMSE's output-error search, rounding by GPTQ
        _, scale, zero = algorithms.seqmse(w, grid, h)
        return algorithms.gptq(w, grid, h, (scale, zero))
    if algorithm == "seqmse":
        return algorithms.seqmse(w, grid, h)
    if algorithm == "mse":
        return algorithms.mse(w, grid)
    return algorithms.rtn(w, grid)


def _quantize_one(name: str, module: torch.nn.Linear, grid: Grid, algorithm: str, h: torch.Tensor | None,
                  device: str) -> dict[str, Any]:
    w = module.weight.data.float()
    out, inp = w.shape
    rows = out if grid.granularity == "per-tensor" else max(1, CHUNK_ELEMENTS // inp)  # one range: whole
    chunks = [[t.cpu() for t in _calibrate(w[i:i + rows].to(device), grid, algorithm, h)] for i in range(0, out, rows)]
    wq, scale, zero = (torch.cat(parts) for parts in zip(*chunks))
    del chunks
    module.weight.data = wq.to(module.weight.device, module.weight.dtype)
    return {"name": f"{name}.weight", "bits": grid.bits, "granularity": grid.granularity,
            "block_size": grid.block_size, "symmetric": grid.symmetric, "sqnr_db": round(sqnr_db(w, wq), 3),
            "grid": grid, "scale": scale, "zero": zero}


def quantize_weights(model: torch.nn.Module, scheme: dict[str, Any], algorithm: str,
                     batches: list[torch.Tensor], device: str = "cpu",
                     checkpoint: Path | None = None) -> list[dict[str, Any]]:
    """Replace weights by their fake-quantized values in place; return one report row per weight.

    SeqMSE and GPTQ go sequentially, as in the GPTQ paper and AIMET's SeqMSE: decoder layer i is
    calibrated on what the already-quantized layers 0..i-1 hand it, so each layer also corrects
    the error upstream of it; the LM head last, on the quantized model's final hidden states.
    Layers are moved to `device` one at a time. With a `checkpoint` dir, each finished layer is
    saved there and a later call with the same dir resumes after the last one saved."""
    done: set[int] = set()
    todo: dict[str, tuple[torch.nn.Linear, Grid]] = {}
    for name, module in quantizable(model):
        grid = grid_for(name, scheme, tuple(module.weight.shape))
        if grid is not None and id(module.weight) not in done:
            done.add(id(module.weight))
            todo[name] = (module, grid)
    if algorithm not in ("seqmse", "gptq"):
        return [_quantize_one(n, m, g, algorithm, None, device)
                for n, (m, g) in progress(todo.items(), f"{algorithm} weights", "weight", len(todo))]

    rows: list[dict[str, Any]] = []
    states = layer0_inputs(model, batches, device)
    layers = model.model.layers
    saved, start = None, 0
    if checkpoint is not None:
        saved = LayerCheckpoints(checkpoint, {"algorithm": algorithm, "scheme": scheme, "device": device,
                                              "prompts": [b.shape[-1] for b in batches], "layers": len(layers)})
        last = saved.last_layer()
        if last >= 0:
            rows, hidden = saved.restore(last, dict(model.named_modules()), device)
            states = [(h, kwargs) for h, (_, kwargs) in zip(hidden, states, strict=True)]
            start = last + 1
            print(f"{algorithm}: resuming after layer {last} of {len(layers)} (per-layer checkpoint)", flush=True)
    with torch.no_grad():
        for i, layer in progress(enumerate(layers), f"{algorithm} weights", "layer", len(layers)):
            if i < start:
                continue
            mine = {n: todo[n] for n in todo if n.startswith(f"model.layers.{i}.")}
            layer.to(device)
            with HessianTap({n: m for n, (m, _) in mine.items()}) as tap:
                for hidden, kwargs in states:
                    layer(hidden, **kwargs)
            done_here = [_quantize_one(n, m, g, algorithm, tap.h[n], device) for n, (m, g) in mine.items()]
            rows += done_here
            states = [(layer_output(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in states]
            layer.to("cpu")
            if saved is not None:
                saved.save(i, done_here, {n: m for n, (m, _) in mine.items()}, [h for h, _ in states])
        heads = {n: v for n, v in todo.items() if not n.startswith("model.layers.")}
        if heads:  # the LM head's input: the final norm of the last layer's output
            norm = model.model.norm.to(device)
            h = sum(algorithms.hessian(norm(hidden).reshape(-1, hidden.shape[-1])) for hidden, _ in states)
            norm.to("cpu")
            rows += [_quantize_one(n, m, g, algorithm, h, device) for n, (m, g) in heads.items()]
    return rows


def quant_param(name: str, w: torch.Tensor, grid: Grid, scale: torch.Tensor, zero: torch.Tensor,
                shape: tuple[int, ...]) -> QuantParam:
    """Integer codes and DequantizeLinear layout of weight `w` (HF layout) for an ONNX initializer
    of `shape` (a 1x1 Conv's [out, in, 1, 1], an embedding's [vocab, hidden], a norm's [hidden])."""
    from pipeline.qnn.quant.encodings import encoding_from_grid
    from pipeline.qnn.quant.qdq import QuantParam

    codes = quantize(grid.groups(w.reshape(w.shape[0], -1) if w.ndim > 1 else w[None]), scale, zero, grid)
    if grid.granularity == "per-tensor":
        axis, onnx_scale = None, scale.reshape(())
    elif grid.granularity == "per-channel":
        axis, onnx_scale = 0, scale.reshape(-1)
    else:
        axis, onnx_scale = 1, scale.reshape(scale.shape[0], scale.shape[1], *[1] * (len(shape) - 2))
    encoding = encoding_from_grid(name, grid.bits, grid.symmetric, scale.flatten().tolist(), zero.flatten().tolist(),
                                  grid.qmin, grid.block_size if axis == 1 else None)
    # the narrowest integer type holding the grid: at 1B, int32 codes alone were 5 GB
    narrow = (torch.int8 if grid.symmetric else torch.uint8) if grid.bits <= 8 else torch.int32
    return QuantParam(encoding, codes.reshape(shape).to(narrow).numpy(), onnx_scale.numpy(),
                      zero.reshape(onnx_scale.shape).to(torch.int32).numpy(), axis,
                      grid.block_size if axis == 1 else None)


def onnx_params(model: torch.nn.Module, scheme: dict[str, Any], rows: list[dict[str, Any]],
                names: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> dict[str, QuantParam]:
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
            grid = grid_for(hf_name, scheme, tuple(w.shape))
            if grid is None:
                continue
            _, scale, zero = algorithms.rtn(w.reshape(w.shape[0], -1) if w.ndim > 1 else w[None], grid)
        params[onnx_name] = quant_param(onnx_name, w, grid, scale, zero, shapes[onnx_name])
    return params
