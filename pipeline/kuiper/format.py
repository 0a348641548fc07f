"""KuiperLLama's int8 model file (KuiperLLama `export.py --version 3`, llama2.c lineage): writer,
reader, and a numpy reference forward pass over what the reader loads.

Layout (little-endian):
  header   8 × int32: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size (negative when
           the classifier is not the embedding), max_seq_len, group_size
  part 2   for each of wq, wk, wv, wo, w1, w2, w3, every layer in turn: int8 weights
           (row-major, [out, in]) then their fp32 scales, one per `group_size` consecutive
           weights; then the classifier the same way when it is not shared
  part 3   fp32: embedding table [vocab, dim], attention norms (each layer), FFN norms (each
           layer), final norm
Quantization is symmetric: scale = max|w| / 127 per group, q = round(w / scale) in [-127, 127].
wq and wk are stored in Meta's interleaved-RoPE row order (HF permutes them for its rotate-half
RoPE; the export reverses that), so a reader applies RoPE to adjacent pairs. The format carries no
RoPE theta or norm epsilon: they travel in kuiper.json beside the file.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pipeline.engine.errors import KilnError

HEADER = struct.Struct("<8i")
QUANTIZED = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
HF_NAMES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
            "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}


@dataclass(frozen=True)
class Header:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # negative: the classifier is stored (quantized) after the layer weights
    max_seq_len: int
    group_size: int

    @property
    def shared_classifier(self) -> bool:
        return self.vocab_size > 0

    @property
    def vocab(self) -> int:
        return abs(self.vocab_size)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def pack(self) -> bytes:
        return HEADER.pack(*(getattr(self, f.name) for f in fields(self)))

    def shapes(self) -> dict[str, tuple[int, int]]:
        kv = self.n_kv_heads * self.head_dim
        return {"wq": (self.dim, self.dim), "wk": (kv, self.dim), "wv": (kv, self.dim), "wo": (self.dim, self.dim),
                "w1": (self.hidden_dim, self.dim), "w2": (self.dim, self.hidden_dim), "w3": (self.hidden_dim, self.dim)}


def quantize_q8(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per group of `group` consecutive weights (row-major): (q int8, scales fp32)."""
    flat = np.asarray(w, dtype=np.float32).reshape(-1, group)
    scale = (np.abs(flat).max(axis=1) / np.float32(127.0)).astype(np.float32)
    safe = np.where(scale == 0, np.float32(1), scale)  # an all-zero group stays zero
    q = np.clip(np.rint(flat / safe[:, None]), -127, 127).astype(np.int8)
    return q.reshape(w.shape), scale


def dequantize_q8(q: np.ndarray, scale: np.ndarray, group: int) -> np.ndarray:
    return (q.reshape(-1, group).astype(np.float32) * scale[:, None]).reshape(q.shape)


def to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's rotate-half row order of wq/wk → Meta's interleaved pairs (KuiperLLama's permute_reverse)."""
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).transpose(0, 2, 1, 3).reshape(out, inp)


def header_for(config: dict[str, Any], group_size: int, max_seq_len: int, shared: bool) -> Header:
    """The header of a HF Llama config, or an error naming what the format cannot hold."""
    dim, heads = config["hidden_size"], config["num_attention_heads"]
    problems = []
    if config.get("model_type") != "llama":
        problems.append(f"model_type {config.get('model_type')!r} (the format is Llama's)")
    if config.get("head_dim", dim // heads) != dim // heads:
        problems.append(f"head_dim {config['head_dim']} != hidden_size / heads (the header has no head_dim)")
    if config.get("attention_bias") or config.get("mlp_bias"):
        problems.append("attention/MLP biases (the format stores none)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"RoPE scaling {rope.get('rope_type')!r} (plain RoPE only)")
    for name, n in (("hidden_size", dim), ("intermediate_size", config["intermediate_size"])):
        if n % group_size:
            problems.append(f"{name} {n} is not a multiple of the group size {group_size}")
    if problems:
        raise KilnError("the Kuiper int8 format cannot hold this model: " + "; ".join(problems))
    vocab = config["vocab_size"]
    return Header(dim, config["intermediate_size"], config["num_hidden_layers"], heads,
                  config.get("num_key_value_heads", heads), vocab if shared else -vocab, max_seq_len, group_size)


def write_model(f: BinaryIO, header: Header, tensor: Any) -> float:
    """Write the file; `tensor(hf_name)` returns a float32 array. Returns the largest quantization error."""
    f.write(header.pack())
    worst = 0.0

    def put_q8(w: np.ndarray) -> None:
        nonlocal worst
        q, s = quantize_q8(w, header.group_size)
        worst = max(worst, float(np.abs(dequantize_q8(q, s, header.group_size) - w).max()))
        f.write(q.tobytes())
        f.write(s.astype("<f4").tobytes())

    for name in QUANTIZED:
        for i in range(header.n_layers):
            w = tensor(f"model.layers.{i}.{HF_NAMES[name]}.weight")
            if name == "wq":
                w = to_interleaved(w, header.n_heads)
            elif name == "wk":
                w = to_interleaved(w, header.n_kv_heads)
            put_q8(w)
    if not header.shared_classifier:
        put_q8(tensor("lm_head.weight"))
    fp32 = ["model.embed_tokens.weight", *[f"model.layers.{i}.input_layernorm.weight" for i in range(header.n_layers)],
            *[f"model.layers.{i}.post_attention_layernorm.weight" for i in range(header.n_layers)], "model.norm.weight"]
    for name in fp32:
        f.write(np.ascontiguousarray(tensor(name), dtype="<f4").tobytes())
    return worst


@dataclass
class KuiperModel:
    header: Header
    layers: list[dict[str, np.ndarray]]  # dequantized wq..w3 and the two norms, per layer
    embedding: np.ndarray
    classifier: np.ndarray
    norm: np.ndarray


def read_model(path: Path) -> KuiperModel:
    """Load a file written in the Kuiper int8 layout; its size must be exactly what the header implies."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    if data.size < HEADER.size:
        raise KilnError(f"{path}: {data.size} bytes, shorter than the 32-byte header")
    h = Header(*HEADER.unpack(bytes(data[:HEADER.size])))
    if min(h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.group_size, h.max_seq_len) <= 0 or h.vocab_size == 0:
        raise KilnError(f"{path}: implausible header {h}")
    pos = HEADER.size

    def take(n: int, dtype: str) -> np.ndarray:
        nonlocal pos
        size = n * np.dtype(dtype).itemsize
        if pos + size > data.size:
            raise KilnError(f"{path}: ends at byte {data.size}, the header implies more (reading {n} × {dtype} at {pos})")
        arr = np.frombuffer(data, dtype=dtype, count=n, offset=pos)
        pos += size
        return arr

    def q8(shape: tuple[int, int]) -> np.ndarray:
        n = shape[0] * shape[1]
        q = take(n, "i1").reshape(shape)
        return dequantize_q8(q, take(n // h.group_size, "<f4"), h.group_size)

    shapes = h.shapes()
    layers: list[dict[str, np.ndarray]] = [{} for _ in range(h.n_layers)]
    for name in QUANTIZED:
        for layer in layers:
            layer[name] = q8(shapes[name])
    classifier = None if h.shared_classifier else q8((h.vocab, h.dim))
    embedding = take(h.vocab * h.dim, "<f4").reshape(h.vocab, h.dim)
    for key in ("attention_norm", "ffn_norm"):
        for layer in layers:
            layer[key] = take(h.dim, "<f4")
    norm = take(h.dim, "<f4")
    if pos != data.size:
        raise KilnError(f"{path}: {data.size - pos} bytes left after the last tensor the header implies")
    return KuiperModel(h, layers, embedding, embedding if classifier is None else classifier, norm)


def _rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def forward(m: KuiperModel, tokens: list[int], rope_theta: float, eps: float) -> np.ndarray:
    """Logits [len(tokens), vocab] of the model as read, llama2.c-style: RoPE on adjacent pairs."""
    h = m.header
    hd, n = h.head_dim, len(tokens)
    pair = np.arange(0, hd, 2, dtype=np.float64)
    angle = np.arange(n, dtype=np.float64)[:, None] * rope_theta ** (-pair / hd)[None, :]  # [n, hd/2]
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)

    def rope(x: np.ndarray) -> np.ndarray:  # [n, heads, hd]
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos[:, None] - b * sin[:, None]
        out[..., 1::2] = a * sin[:, None] + b * cos[:, None]
        return out

    causal = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
    x = m.embedding[tokens].astype(np.float32)
    group = h.n_heads // h.n_kv_heads
    for L in m.layers:
        xb = _rmsnorm(x, L["attention_norm"], eps)
        q = rope((xb @ L["wq"].T).reshape(n, h.n_heads, hd))
        k = rope((xb @ L["wk"].T).reshape(n, h.n_kv_heads, hd))
        v = (xb @ L["wv"].T).reshape(n, h.n_kv_heads, hd)
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.float32(np.sqrt(hd)) + causal
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        att = np.einsum("hqk,khd->qhd", scores / scores.sum(-1, keepdims=True), v).reshape(n, h.dim)
        x = x + att @ L["wo"].T
        xb = _rmsnorm(x, L["ffn_norm"], eps)
        gate = xb @ L["w1"].T
        x = x + (gate / (1 + np.exp(-gate)) * (xb @ L["w3"].T)) @ L["w2"].T
    return _rmsnorm(x, m.norm, eps) @ m.classifier.T
