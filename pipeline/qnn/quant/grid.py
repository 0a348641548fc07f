"""Integer grids: scales and zero points per tensor, per output channel or per block of inputs.

A weight W [out, in] is viewed as groups [out, n_groups, group]: per-tensor is one
group of everything, per-channel one group per row, per-block `in/block` groups per row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Grid:
    bits: int
    granularity: str = "per-channel"  # per-tensor | per-channel | per-block
    block_size: int | None = None
    symmetric: bool = True

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    def groups(self, w: torch.Tensor) -> torch.Tensor:
        out, inp = w.shape
        if self.granularity == "per-tensor":
            return w.reshape(1, 1, out * inp)
        if self.granularity == "per-channel":
            return w.reshape(out, 1, inp)
        if not self.block_size or inp % self.block_size:
            raise ValueError(f"block size {self.block_size} does not divide the input width {inp}")
        return w.reshape(out, inp // self.block_size, self.block_size)


def scale_zero(groups: torch.Tensor, grid: Grid, ratio: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale (and zero point) per group, the range shrunk by `ratio` (clipping)."""
    if grid.symmetric:
        amax = groups.abs().amax(-1, keepdim=True) * ratio
        scale = (amax / grid.qmax).clamp(min=1e-12)
        return scale, torch.zeros_like(scale)
    lo = (groups.amin(-1, keepdim=True) * ratio).clamp(max=0)
    hi = (groups.amax(-1, keepdim=True) * ratio).clamp(min=0)
    scale = ((hi - lo) / (grid.qmax - grid.qmin)).clamp(min=1e-12)
    return scale, torch.round(-lo / scale) + grid.qmin


def quantize(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Integer codes of `groups` on the grid."""
    return torch.clamp(torch.round(groups / scale) + zero, grid.qmin, grid.qmax)


def fake_quant(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid) -> torch.Tensor:
    return (quantize(groups, scale, zero, grid) - zero) * scale
