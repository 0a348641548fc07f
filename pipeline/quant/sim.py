"""Torch quantization sim of the adapted model (pipeline/adapted_llama.py), the reference the
QDQ ONNX is checked against.

Fake-quantizers sit where the device quantizes: every 1x1-conv and norm output (activation
bits, asymmetric unsigned, as QNN's A16) and the new K/V leaving each layer (KV bits). A K/V
encoding is computed once per layer and kind, and serves past_*_in, past_*_out and every AR
graph: Genie copies KV bytes raw between steps and graphs. Use: calibrate (`observe`), then
`freeze` and run.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..adapted_llama import AdaptedLlama, RMSNorm
from .encodings import Encoding, encoding_from_grid
from .grid import Grid, fake_quant, scale_zero


class FakeQuant(nn.Module):
    """Min-max observer until frozen, then an asymmetric per-tensor fake-quantizer."""

    def __init__(self, bits: int):
        super().__init__()
        self.grid = Grid(bits, "per-tensor", symmetric=False)
        self.lo, self.hi = math.inf, -math.inf
        self.scale: torch.Tensor | None = None
        self.zero: torch.Tensor | None = None

    @classmethod
    def from_range(cls, bits: int, lo: float, hi: float) -> "FakeQuant":
        fq = cls(bits)
        fq.lo, fq.hi = lo, hi
        fq.freeze()
        return fq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            self.lo, self.hi = min(self.lo, x.min().item()), max(self.hi, x.max().item())
            return x
        return fake_quant(x, self.scale, self.zero, self.grid)

    def freeze(self) -> None:
        if self.lo > self.hi:
            raise RuntimeError("a fake-quantizer saw no calibration data")
        self.scale, self.zero = scale_zero(torch.tensor([[[self.lo, self.hi]]]), self.grid)

    def encoding(self, name: str) -> Encoding:
        return encoding_from_grid(name, self.grid.bits, False, [self.scale.item()], [self.zero.item()], self.grid.qmin)


class QuantSim:
    def __init__(self, model: AdaptedLlama, act_bits: int, kv_bits: int):
        self.model = model
        self.quantizers: list[FakeQuant] = []
        self.kv: dict[str, FakeQuant] = {}
        if act_bits < 32:
            for module in model.modules():
                if isinstance(module, (nn.Conv2d, RMSNorm)):
                    fq = self._add(act_bits)
                    module.register_forward_hook(lambda m, args, out, fq=fq: fq(out))
        if kv_bits < 32:
            for i, block in enumerate(model.blocks):
                block.attn.k_out = self.kv[f"key_{i}"] = self._add(kv_bits)
                block.attn.v_out = self.kv[f"value_{i}"] = self._add(kv_bits)

    def _add(self, bits: int) -> FakeQuant:
        fq = FakeQuant(bits)
        self.quantizers.append(fq)
        return fq

    def freeze(self) -> None:
        for fq in self.quantizers:
            fq.freeze()

    def kv_encodings(self) -> dict[str, Encoding]:
        """Graph tensor name -> encoding, the same one for past_X_i_in and past_X_i_out."""
        return {f"past_{kind}_{side}": fq.encoding(f"past_{kind}_{side}")
                for kind, fq in self.kv.items() for side in ("in", "out")}
