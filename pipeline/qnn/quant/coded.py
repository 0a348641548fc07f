"""Quantized weights held in the sim the way the QDQ graph holds them: integer codes with their
scale and zero point, dequantized at the moment an op reads them.

DequantizeLinear (and `qdq.dequantize`) computes (code - zero) * scale in float32; so does
`CodedWeight`, operation for operation, so the values an op sees are bit-identical to a float
copy's. What it saves is the copy: at 1B the dequantized float weights were 6 GB beside 1.2 GB
of codes, for a transient of one weight at a time (the LM head's 1 GB is the largest).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.qnn.quant.qdq import QuantParam


class CodedWeight(nn.Module):
    """A weight as codes + scale/zero; `forward()` dequantizes it (or only `rows` of it)."""

    def __init__(self, p: QuantParam):
        super().__init__()
        self.codes = torch.from_numpy(p.codes)  # shared with the stage's QuantParam, not copied
        scale = torch.from_numpy(p.scale.astype(np.float32))
        zero = torch.from_numpy(p.zero_point.astype(np.float32))
        self.block = p.block_size
        if self.block:  # scale [out, n_blocks, 1...] against codes grouped [out, n_blocks, block, 1...]
            scale, zero = scale.unsqueeze(2), zero.unsqueeze(2)
        elif p.axis == 0:
            scale, zero = (a.reshape(-1, *[1] * (p.codes.ndim - 1)) for a in (scale, zero))
        self.scale, self.zero = scale, zero

    def forward(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        codes, scale, zero = self.codes, self.scale, self.zero
        if rows is not None:  # an embedding lookup: only these rows, each on its own row's grid
            codes = codes[rows]
            if scale.ndim:
                scale, zero = scale[rows], zero[rows]
        shape = codes.shape
        if self.block:
            codes = codes.reshape(shape[0], shape[1] // self.block, self.block, *shape[2:])
        w = codes.to(torch.float32)  # a fresh tensor: the in-place steps below never touch the codes
        return w.sub_(zero).mul_(scale).reshape(shape)


class CodedConv(nn.Module):
    """A 1x1 Conv2d (no padding, stride 1) whose weight is a CodedWeight."""

    def __init__(self, conv: nn.Conv2d, weight: CodedWeight):
        super().__init__()
        if (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups) != ((1, 1), (1, 1), (0, 0), (1, 1), 1):
            raise ValueError(f"CodedConv stands in for plain 1x1 convolutions, not {conv}")
        self.weight = weight
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.weight(), self.bias)


class CodedEmbedding(nn.Module):
    """An embedding lookup that dequantizes only the rows it looks up."""

    def __init__(self, weight: CodedWeight):
        super().__init__()
        self.weight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight(ids.reshape(-1).long())
        return rows.reshape(*ids.shape, rows.shape[-1])


def hold_as_codes(model: nn.Module, params: dict[str, QuantParam]) -> list[str]:
    """Give `model`'s Conv2d and Embedding weights named in `params` (ONNX initializer name =
    parameter path) to coded modules; return the names of the other params (norm weights and the
    like: small, the caller sets their float values)."""
    rest = []
    for name, p in params.items():
        path, _, leaf = name.rpartition(".")
        owner = model.get_submodule(path)
        if leaf != "weight" or not isinstance(owner, (nn.Conv2d, nn.Embedding)):
            rest.append(name)
            continue
        coded = CodedWeight(p)
        if tuple(coded.codes.shape) != tuple(owner.weight.shape):
            raise ValueError(f"{name}: codes of shape {tuple(coded.codes.shape)} for a weight of shape "
                             f"{tuple(owner.weight.shape)}")
        parent, _, attr = path.rpartition(".")
        replacement = CodedConv(owner, coded) if isinstance(owner, nn.Conv2d) else CodedEmbedding(coded)
        setattr(model.get_submodule(parent) if parent else model, attr, replacement)
    return rest
