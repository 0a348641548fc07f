"""Torch quantization sim of the adapted model (pipeline/qnn/adapted_llama.py), the reference the
QDQ ONNX is checked against.

Like the device (and the QDQ graph), it quantizes the output of every compute op: a
TorchFunctionMode sees each torch call of the forward pass, and the float outputs of
arithmetic, matmul, concat, softmax, SiLU, convolution and embedding lookups pass through a
fake-quantizer of their own (indexed by call order, which is the same at every step).
Data movement (view, transpose, slice) keeps its input's grid. RMSNorm is one op on HTP, so
only its output is quantized; the graph inputs mask/cos/sin are quantized on entry. The new
K/V leaving each layer get the KV encoding, one per layer and kind, shared by past_*_in,
past_*_out and every AR graph (Genie copies KV bytes raw).

Use: run the calibration prompts (observe), `freeze`, then run (simulate).
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from pipeline.qnn.adapted_llama import AdaptedLlama, RMSNorm, Step
from pipeline.qnn.quant.coded import CodedEmbedding, CodedWeight
from pipeline.qnn.quant.encodings import Encoding
from pipeline.qnn.quant.observer import Observer

QUANTIZED_CALLS = {"add", "__add__", "__radd__", "sub", "__sub__", "__rsub__", "mul", "__mul__", "__rmul__",
                   "div", "__truediv__", "matmul", "__matmul__", "cat", "softmax", "silu", "conv2d", "embedding"}


class Quantizer:
    """Observer until frozen, then a fake-quantizer on its encoding (integer grid or float16)."""

    def __init__(self, bits: int, float16_ratio: float):
        self.bits, self.float16_ratio = bits, float16_ratio
        self.observer = Observer()
        self.frozen: Encoding | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        e = self.frozen
        if e is None:
            self.observer.update(x)
            return x
        if e.is_float:
            return x.half().float()
        scale, zero = torch.tensor(e.scale[0]), torch.tensor(float(-e.offset[0]))
        return (torch.clamp(torch.round(x / scale) + zero, 0, 2 ** e.bits - 1) - zero) * scale

    def freeze(self, name: str = "") -> None:
        self.frozen = self.observer.encoding(name, self.bits, self.float16_ratio)


class _Taps(TorchFunctionMode):
    def __init__(self, sim: QuantSim):
        super().__init__()
        self.sim = sim

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (self.sim.opaque == 0 and getattr(func, "__name__", "") in QUANTIZED_CALLS
                and isinstance(out, torch.Tensor) and out.is_floating_point()):
            out = self.sim.tap(out)
        return out


class KvOut(nn.Module):
    """Replaces the adapted model's k_out/v_out identities: the KV cache's quantizer."""

    def __init__(self, quantizer: Quantizer):
        super().__init__()
        self.quantizer = quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer(x)


class QuantSim:
    def __init__(self, model: AdaptedLlama, act_bits: int, kv_bits: int, float16_ratio: float):
        self.model, self.act_bits, self.float16_ratio = model, act_bits, float16_ratio
        self.acts: list[Quantizer] = []
        self.calls = 0
        self.opaque = 0  # >0 inside RMSNorm or a quantizer: their inner calls are not ops of the graph
        self.kv: dict[str, Quantizer] = {}
        opaque: list[nn.Module] = []
        if kv_bits < 32:
            for i, block in enumerate(model.blocks):
                for kind, attr in (("key", "k_out"), ("value", "v_out")):
                    self.kv[f"{kind}_{i}"] = Quantizer(kv_bits, float16_ratio)
                    setattr(block.attn, attr, KvOut(self.kv[f"{kind}_{i}"]))
                    opaque.append(getattr(block.attn, attr))
        # weights held as codes: their dequantization is not an op of the graph (a DequantizeLinear
        # of an initializer, no activation encoding)
        opaque += [m for m in model.modules() if isinstance(m, CodedWeight)]
        if act_bits < 32:
            # one op on HTP, one encoding for its output: RMSNorm, and an embedding lookup of coded rows
            fused = [m for m in model.modules() if isinstance(m, (RMSNorm, CodedEmbedding))]
            for module in fused:
                module.register_forward_hook(lambda m, args, out: self._after_opaque(out, quantize=True),
                                             always_call=True)
            opaque += fused
        for module in opaque:
            module.register_forward_pre_hook(lambda m, args: self._enter())
            if not isinstance(module, (RMSNorm, CodedEmbedding)):
                module.register_forward_hook(lambda m, args, out: self._after_opaque(out, quantize=False))

    def _enter(self) -> None:
        self.opaque += 1

    def _after_opaque(self, out: torch.Tensor, quantize: bool) -> torch.Tensor:
        result = self.tap(out) if quantize else out  # still opaque: the tap's own calls are not taps
        self.opaque -= 1
        return result

    def tap(self, x: torch.Tensor) -> torch.Tensor:
        self.opaque += 1
        try:
            if self.calls == len(self.acts):
                if self.acts and self.acts[0].frozen is not None:
                    raise RuntimeError("the frozen sim met an op it never saw in calibration")
                self.acts.append(Quantizer(self.act_bits, self.float16_ratio))
            out = self.acts[self.calls](x)
            self.calls += 1
            return out
        finally:
            self.opaque -= 1

    def step(self) -> Step:
        """A step function (inputs tuple -> outputs) running the model under the sim."""
        def run(inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
            self.calls = 0
            with torch.no_grad():
                if self.act_bits >= 32:
                    return list(self.model(*inputs))
                with _Taps(self):
                    ids, mask, cos, sin, *past = inputs
                    return list(self.model(ids, self.tap(mask), self.tap(cos), self.tap(sin), *past))
        return run

    def freeze(self) -> None:
        for q in self.acts:
            q.freeze()
        for name, q in self.kv.items():
            q.freeze(name)

    def float16_share(self) -> float:
        return sum(q.frozen.is_float for q in self.acts) / max(len(self.acts), 1)

    def kv_encodings(self) -> dict[str, Encoding]:
        """Graph tensor name -> encoding, the same one for past_X_i_in and past_X_i_out."""
        return {f"past_{kind}_{side}": replace(q.frozen, name=f"past_{kind}_{side}")
                for kind, q in self.kv.items() for side in ("in", "out")}
