"""A Llama adapted for on-device graphs (Qualcomm's layout), readable top to bottom.

Differences from the HF module it is built from, each for the NPU:
- every Linear is a 1x1 Conv2d (HTP runs convolutions best);
- the causal mask and RoPE cos/sin are graph *inputs* computed outside, so one
  static graph serves every position (Llama 3 rope scaling included: cos/sin
  come from the HF model's own rotary embedding);
- past K/V come in, and only the *new* K/V of the current tokens go out, in
  the layout Genie copies between steps: keys [kv_heads, 1, head_dim, len],
  values [kv_heads, 1, len, head_dim];
- one graph per AR length (tokens per step) at a fixed context length.
Covers Llama 2/3, TinyLlama, SmolLM and Qwen2-style GQA (q/k/v biases kept).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.engine.progress import progress

# Additive mask value: exp(-100) is 0 next to any real score, and the range stays small enough
# for a 16-bit activation encoding of scores + mask (-1e4 would cost 0.15 per step).
MASK_MIN = -100.0


@dataclass(frozen=True)
class Dims:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    eps: float

    @classmethod
    def of(cls, config) -> Dims:
        heads = config.num_attention_heads
        return cls(hidden=config.hidden_size, heads=heads, kv_heads=getattr(config, "num_key_value_heads", heads),
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   layers=config.num_hidden_layers, vocab=config.vocab_size, eps=config.rms_norm_eps)


class Conv1x1(nn.Module):
    """y = W x + b as a 1x1 convolution over [1, in, 1, T]."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        # views of the Linear's storage, never copies: at 1B a copy of every weight is 5 GB more
        self.conv = nn.Conv2d(linear.in_features, linear.out_features, 1, bias=linear.bias is not None, device="meta")
        self.conv.weight = nn.Parameter(linear.weight.detach()[:, :, None, None], requires_grad=False)
        if linear.bias is not None:
            self.conv.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [1, T, in] -> [1, T, out]
        return self.conv(x.transpose(1, 2)[:, :, None, :])[:, :, 0, :].transpose(1, 2)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE; x [..., T, D], cos/sin [T, D/2] (Genie's pos-id-dim = D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, hf_attn: nn.Module, d: Dims):
        super().__init__()
        self.d = d
        self.q, self.k, self.v = Conv1x1(hf_attn.q_proj), Conv1x1(hf_attn.k_proj), Conv1x1(hf_attn.v_proj)
        self.o = Conv1x1(hf_attn.o_proj)
        # Where the new K/V leave the layer (graph outputs past_*_out, also read by this step's
        # attention): identities in the export, fake-quantizers in the quantization sim.
        self.k_out, self.v_out = nn.Identity(), nn.Identity()

    def forward(self, x, mask, cos, sin, past_k, past_v):
        d, t = self.d, x.shape[1]
        group = d.heads // d.kv_heads
        q = rope(self.q(x).view(t, d.heads, d.head_dim).transpose(0, 1), cos, sin)        # [H, T, D]
        k = rope(self.k(x).view(t, d.kv_heads, d.head_dim).transpose(0, 1), cos, sin)     # [KVH, T, D]
        v = self.v(x).view(t, d.kv_heads, d.head_dim).transpose(0, 1)                     # [KVH, T, D]
        new_k, new_v = self.k_out(k.transpose(1, 2)[:, None]), self.v_out(v[:, None])     # [KVH,1,D,T], [KVH,1,T,D]
        keys = torch.cat([past_k, new_k], dim=-1)                                         # [KVH, 1, D, CL]
        values = torch.cat([past_v, new_v], dim=-2)                                       # [KVH, 1, CL, D]
        q = q.reshape(d.kv_heads, group, t, d.head_dim)                                   # heads grouped per KV head
        scores = (q @ keys) * d.head_dim ** -0.5 + mask[0]                                # [KVH, G, T, CL]
        out = torch.softmax(scores, dim=-1) @ values                                      # [KVH, G, T, D]
        out = out.reshape(d.heads, t, d.head_dim).transpose(0, 1).reshape(1, t, d.heads * d.head_dim)
        return self.o(out), new_k, new_v


class MLP(nn.Module):
    def __init__(self, hf_mlp: nn.Module):
        super().__init__()
        self.gate, self.up, self.down = Conv1x1(hf_mlp.gate_proj), Conv1x1(hf_mlp.up_proj), Conv1x1(hf_mlp.down_proj)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, hf_layer: nn.Module, d: Dims):
        super().__init__()
        self.norm1 = RMSNorm(hf_layer.input_layernorm.weight, d.eps)
        self.attn = Attention(hf_layer.self_attn, d)
        self.norm2 = RMSNorm(hf_layer.post_attention_layernorm.weight, d.eps)
        self.mlp = MLP(hf_layer.mlp)

    def forward(self, x, mask, cos, sin, past_k, past_v):
        a, new_k, new_v = self.attn(self.norm1(x), mask, cos, sin, past_k, past_v)
        x = x + a
        return x + self.mlp(self.norm2(x)), new_k, new_v


class AdaptedLlama(nn.Module):
    """forward(input_ids, attention_mask, position_ids_cos, position_ids_sin, past_key_0_in, past_value_0_in, ...)
    -> (logits, past_key_0_out, past_value_0_out, ...)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.d = Dims.of(hf_model.config)
        inner = hf_model.model
        self.embed = nn.Embedding.from_pretrained(inner.embed_tokens.weight.detach(), freeze=True)
        self.blocks = nn.ModuleList(Block(layer, self.d) for layer in inner.layers)
        self.norm = RMSNorm(inner.norm.weight, self.d.eps)
        self.lm_head = Conv1x1(hf_model.lm_head)

    def forward(self, input_ids, attention_mask, cos, sin, *past):
        x = self.embed(input_ids.long())
        new_kv = []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, attention_mask, cos[0, 0], sin[0, 0], past[2 * i], past[2 * i + 1])
            new_kv += [k, v]
        return (self.lm_head(self.norm(x)), *new_kv)


def io_names(layers: int) -> tuple[list[str], list[str]]:
    past_in = [f"past_{kind}_{i}_in" for i in range(layers) for kind in ("key", "value")]
    past_out = [f"past_{kind}_{i}_out" for i in range(layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids_cos", "position_ids_sin", *past_in], ["logits", *past_out]


def hf_names(layers: int) -> dict[str, str]:
    """ONNX initializer name (this module's parameter path) -> the HF parameter it came from."""
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.conv.weight": "lm_head.weight"}
    for i in range(layers):
        ours, theirs = f"blocks.{i}", f"model.layers.{i}"
        names[f"{ours}.norm1.weight"] = f"{theirs}.input_layernorm.weight"
        names[f"{ours}.norm2.weight"] = f"{theirs}.post_attention_layernorm.weight"
        for a, b in (("attn.q", "self_attn.q_proj"), ("attn.k", "self_attn.k_proj"), ("attn.v", "self_attn.v_proj"),
                     ("attn.o", "self_attn.o_proj"), ("mlp.gate", "mlp.gate_proj"), ("mlp.up", "mlp.up_proj"),
                     ("mlp.down", "mlp.down_proj")):
            names[f"{ours}.{a}.conv.weight"] = f"{theirs}.{b}.weight"
    return names


def rope_tables(hf_model: nn.Module, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [1, 1, T, D/2] for absolute `positions`, from the HF model's own rotary embedding
    (so rope scaling such as Llama 3's matches the original exactly)."""
    rotary = hf_model.model.rotary_emb
    dummy = torch.zeros(1, dtype=torch.float32)
    cos, sin = rotary(dummy, positions[None].long())
    half = cos.shape[-1] // 2
    return cos[..., :half][:, None].float(), sin[..., :half][:, None].float()


def release_weights(hf_model: nn.Module) -> None:
    """Empty the HF model's parameters once nothing needs its forward pass: `step_inputs` (what every
    AR step needs of it) reads only its config and RoPE buffers. At 1B that is 5 GB that would
    otherwise sit beside an onnxruntime session holding the same weights."""
    for param in hf_model.parameters():
        param.data = torch.empty(0)


def step_inputs(hf_model: nn.Module, ids: list[int], start: int, ar: int, context: int,
                past: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """Inputs of one AR step: `ids` (≤ ar tokens, right-padded) at absolute position `start`.

    The past holds `start` valid tokens right-aligned in a window of context-ar slots
    (Qualcomm's layout); the mask opens those and the causal part of the new tokens.
    """
    d = Dims.of(hf_model.config)
    n, past_len = len(ids), context - ar
    input_ids = torch.zeros(1, ar, dtype=torch.int32)
    input_ids[0, :n] = torch.tensor(ids, dtype=torch.int32)
    mask = torch.full((1, 1, ar, context), MASK_MIN)
    for row in range(ar):
        mask[0, 0, row, past_len - start:past_len] = 0.0
        mask[0, 0, row, past_len:past_len + min(row, n - 1) + 1] = 0.0
    cos, sin = rope_tables(hf_model, torch.arange(start, start + ar))
    if past is None:
        past = [t for _ in range(d.layers) for t in (torch.zeros(d.kv_heads, 1, d.head_dim, past_len),
                                                     torch.zeros(d.kv_heads, 1, past_len, d.head_dim))]
    return (input_ids, mask, cos, sin, *past)


def advance_past(past: list[torch.Tensor], new_kv: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """Append the first `n` new K/V of a step to the right-aligned past windows."""
    out = []
    for i, (old, new) in enumerate(zip(past, new_kv)):
        if i % 2 == 0:  # keys [KVH, 1, D, P]
            out.append(torch.cat([old, new[..., :n]], dim=-1)[..., -old.shape[-1]:])
        else:           # values [KVH, 1, P, D]
            out.append(torch.cat([old, new[..., :n, :]], dim=-2)[..., -old.shape[-2]:, :])
    return out


Step = Callable[[tuple[torch.Tensor, ...]], list[torch.Tensor]]


def steps(step: Step, hf_model: nn.Module, ids: list[int], ar: int, context: int,
          label: str = "") -> Iterator[tuple[tuple[torch.Tensor, ...], list[torch.Tensor], int]]:
    """Feed `ids` (≤ context tokens) through an AR graph in steps of `ar` tokens, the way the
    device does; `step` runs one graph call (torch module or onnxruntime). Yields each step's
    (inputs, outputs, tokens in it). With a `label`, the steps report progress under it."""
    past = None
    starts = range(0, len(ids), ar)
    for start in progress(starts, label, "step") if label else starts:
        chunk = ids[start:start + ar]
        inputs = step_inputs(hf_model, chunk, start, ar, context, past)
        outputs = step(inputs)
        yield inputs, outputs, len(chunk)
        past = advance_past(list(inputs[4:]), outputs[1:], len(chunk))


def run_steps(step: Step, hf_model: nn.Module, ids: list[int], ar: int, context: int,
              on_step: Callable[[tuple[torch.Tensor, ...], list[torch.Tensor]], None] | None = None,
              label: str = "") -> torch.Tensor:
    """`steps`, with every step's logits gathered: [n, vocab]."""
    got = []
    for inputs, outputs, n in steps(step, hf_model, ids, ar, context, label):
        if on_step is not None:
            on_step(inputs, outputs)
        got.append(outputs[0][0, :n])
    return torch.cat(got)


def ar_perplexity(step: Step, hf_model: nn.Module, ids: list[int], ar: int, context: int, windows: int) -> float:
    """exp(mean NLL) over the first `windows` non-overlapping windows of `context` tokens, each run
    through the AR graph step by step (so it measures exactly what the graph computes). Scored
    step by step: a window's logits at context 4096 and a 128k vocabulary are 2 GB, three times
    over with their concatenation and log-softmax."""
    nll, count = 0.0, 0
    for w in progress(range(min(windows, len(ids) // context)), "perplexity", "window"):
        chunk = ids[w * context:(w + 1) * context]
        start = 0
        for _, outputs, n in steps(step, hf_model, chunk, ar, context):
            targets = chunk[start + 1:start + n + 1]  # the next token of each position (none after the last)
            if targets:
                logits = outputs[0][0, :len(targets)].float()
                nll += nn.functional.cross_entropy(logits, torch.tensor(targets), reduction="sum").item()
            start += n
        count += len(chunk) - 1
    return math.exp(nll / count)


def torch_step(model: nn.Module) -> Step:
    def step(inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        with torch.no_grad():
            return list(model(*inputs))
    return step


def resize_past(past: list[torch.Tensor], length: int) -> list[torch.Tensor]:
    """Right-aligned past windows re-cut to `length` slots (another AR graph's window): the
    newest entries stay, empty slots on the left are zeros."""
    out = []
    for i, t in enumerate(past):
        axis = -1 if i % 2 == 0 else -2
        have = t.shape[axis]
        if have >= length:
            out.append(t.narrow(axis, have - length, length))
        else:
            pad = list(t.shape)
            pad[axis] = length - have
            out.append(torch.cat([torch.zeros(pad, dtype=t.dtype), t], dim=axis))
    return out


def prefill_and_decode(steps: dict[int, Step], hf_model: nn.Module, ids: list[int], decode: int,
                       context: int, stop: frozenset[int] = frozenset(), show: bool = True) -> tuple[torch.Tensor, list[int]]:
    """As Genie runs a model: the prompt through the widest AR graph, then `decode` greedy tokens
    one by one through AR-1 (or the narrowest graph), ending early at a token in `stop` (not
    kept). Returns (logits of every prompt position and decode step [len(ids) - 1 + decode + 1,
    vocab] → row i predicts token i + 1, generated tokens). `show`: progress lines."""
    wide, narrow = max(steps), min(steps)
    got, past = [], None
    shown = progress if show else lambda items, *_: items
    for start in shown(range(0, len(ids), wide), f"prefill (AR-{wide})", "step"):
        chunk = ids[start:start + wide]
        inputs = step_inputs(hf_model, chunk, start, wide, context, past)
        outputs = steps[wide](inputs)
        got.append(outputs[0][0, :len(chunk)])
        past = advance_past(list(inputs[4:]), outputs[1:], len(chunk))
    generated: list[int] = []
    position = len(ids)
    past = resize_past(past, context - narrow)
    for _ in shown(range(decode), f"decode (AR-{narrow})", "token"):
        token = int(got[-1][-1].argmax())
        if token in stop:
            break
        generated.append(token)
        inputs = step_inputs(hf_model, [token], position, narrow, context, past)
        outputs = steps[narrow](inputs)
        got.append(outputs[0][0, :1])
        past = advance_past(list(inputs[4:]), outputs[1:], 1)
        position += 1
    return torch.cat(got), generated
