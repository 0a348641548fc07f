"""Activation statistics over calibration, and the encoding they lead to.

Min-max ranges, plus mean |x|: a tensor whose max |x| is many times its mean |x| (SmolLM2's
BOS token drives the residual stream to ~25,000 while ordinary tokens sit near 1) would leave
ordinary values a handful of 16-bit steps; such tensors run in float16 instead (mixed
precision, HTP v73+), the rest on the asymmetric integer grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.qnn.quant.encodings import Encoding, encoding_from_grid, float16
from pipeline.qnn.quant.grid import Grid, scale_zero


@dataclass
class Observer:
    lo: float = math.inf
    hi: float = -math.inf
    abs_sum: float = 0.0
    count: int = 0

    def update(self, x: torch.Tensor | np.ndarray) -> None:
        x = torch.as_tensor(x)
        self.add(x.min().item(), x.max().item(), x.abs().sum(dtype=torch.float64).item(), x.numel())

    def add(self, lo: float, hi: float, abs_sum: float, count: int) -> None:
        """Fold in one tensor's statistics, computed elsewhere (e.g. reduced inside a graph)."""
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.abs_sum += abs_sum
        self.count += count

    @property
    def outlier_ratio(self) -> float:
        mean = self.abs_sum / max(self.count, 1)
        return max(abs(self.lo), abs(self.hi)) / mean if mean > 0 else 1.0

    def encoding(self, name: str, bits: int, float16_ratio: float) -> Encoding:
        """float16 above `float16_ratio` (when 16-bit), else min-max on the unsigned grid."""
        if self.lo > self.hi:
            raise RuntimeError(f"{name}: no calibration data reached this tensor")
        if bits == 16 and self.outlier_ratio > float16_ratio:
            return float16(name)
        grid = Grid(bits, "per-tensor", symmetric=False)
        scale, zero = scale_zero(torch.tensor([[[self.lo, self.hi]]]), grid)
        return encoding_from_grid(name, bits, False, [scale.item()], [zero.item()], grid.qmin)
