"""Shape rehearsal: a deterministic random checkpoint of a published architecture.

Plan memory, time and disk before you have the weights: `model.synthetic` writes the tensors a
Hugging Face `config.json` describes (names and shapes from the model class built on the meta
device, so no weight is ever held twice), shard by shard, each tensor from its own generator
(seed + tensor name): numpy's PCG64 in float64, whose stream is the same on every machine (torch's
float32 randn takes vectorised paths that differ between AVX2, AVX-512 and ARM builds), so the
bytes depend on neither the order nor the machine.
Quality figures measured on such a model mean nothing; time, memory, disk and file formats are
real (docs/models.md#synthetic-checkpoints).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.engine.errors import KilnError

# A config past these bounds is a typo or hostile, not a model this machine could rehearse.
MAX_PARAMETERS = 80e9
MAX_DIMENSION = 1 << 20
SHARD_BYTES = 2 << 30  # a shard is written whole: this (or the largest tensor) bounds the memory


def read_config(path: Path, where: str) -> dict[str, Any]:
    """The HF config, checked cheaply (it runs at plan time: no transformers import): a JSON object
    with a model type and sane sizes; `meta_model` then checks transformers knows the type."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KilnError(f"{where}: model.synthetic.config: {path}: not a readable JSON file ({e})") from e
    if not isinstance(doc, dict):
        raise KilnError(f"{where}: model.synthetic.config: {path}: a Hugging Face config.json is a JSON object")
    kind = doc.get("model_type")
    if not isinstance(kind, str) or not kind:
        raise KilnError(f"{where}: model.synthetic.config: {path}: model_type {kind!r} is not an architecture name")
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        value = doc.get(field)
        if type(value) is not int or not 1 <= value <= MAX_DIMENSION:
            raise KilnError(f"{where}: model.synthetic.config: {path}: {field} must be an integer in "
                            f"1..{MAX_DIMENSION} (got {value!r})")
    return doc


def meta_model(config: dict[str, Any], where: str = "model.synthetic.config") -> Any:
    """The architecture with no storage behind its tensors: names, shapes and tying, for free."""
    import torch
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM

    if config["model_type"] not in CONFIG_MAPPING:
        raise KilnError(f"{where}: model_type {config['model_type']!r} is not an architecture transformers knows")
    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def check_size(model: Any, vocab_needed: int, where: str) -> None:
    n = parameter_count(model)
    if n > MAX_PARAMETERS:
        raise KilnError(f"{where}: model.synthetic.config: {n / 1e9:.1f}B parameters, more than Kiln rehearses "
                        f"({MAX_PARAMETERS / 1e9:.0f}B)")
    if model.config.vocab_size < vocab_needed:
        raise KilnError(f"{where}: model.synthetic.config: vocab_size {model.config.vocab_size} is smaller than the "
                        f"embedded tokenizer's {vocab_needed} ids")


def tensor_seed(seed: int, name: str) -> int:
    from blake3 import blake3

    return int.from_bytes(blake3(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def init_tensor(name: str, shape: tuple[int, ...], dtype: Any, seed: int, std: float, layers: int) -> Any:
    """Norm gammas 1, biases 0, matrices N(0, std); the projections writing into the residual stream
    scaled by 1/sqrt(2 layers) (GPT-2's rule) so activations keep a trained model's range."""
    import numpy as np
    import torch

    if len(shape) == 1:
        return torch.zeros(shape, dtype=dtype) if name.endswith("bias") else torch.ones(shape, dtype=dtype)
    scale = std / math.sqrt(2 * layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
    rng = np.random.Generator(np.random.PCG64(tensor_seed(seed, name)))
    out = torch.empty(shape, dtype=dtype)
    rows = out.view(shape[0], -1)
    step = max(1, (64 << 20) // max(1, rows.shape[1]))  # ~512 MB of float64 at a time
    for start in range(0, shape[0], step):
        block = rng.standard_normal((min(step, shape[0] - start), rows.shape[1])) * scale
        rows[start:start + block.shape[0]] = torch.from_numpy(block).to(dtype)
    return out


def shards(entries: list[tuple[str, tuple[int, ...]]], itemsize: int) -> Iterator[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive groups of tensors of at most SHARD_BYTES (a larger tensor alone)."""
    group: list[tuple[str, tuple[int, ...]]] = []
    size = 0
    for name, shape in entries:
        n = math.prod(shape) * itemsize
        if group and size + n > SHARD_BYTES:
            yield group
            group, size = [], 0
        group.append((name, shape))
        size += n
    if group:
        yield group


def write_checkpoint(model: Any, out: Path, seed: int, dtype_name: str, progress: Any) -> dict[str, int]:
    """safetensors shards + index + config.json; returns {file: bytes}."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    # state_dict() lists a tied LM head too: transformers re-ties it on load, so write it once
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    entries = [(n, tuple(t.shape)) for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")]
    std = float(getattr(model.config, "initializer_range", 0.02))
    layers = model.config.num_hidden_layers
    groups = list(shards(entries, torch.tensor([], dtype=dtype).element_size()))
    weight_map: dict[str, str] = {}
    sizes: dict[str, int] = {}
    total = 0
    for i, group in enumerate(progress(groups, "synthetic shards", "shard"), 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: init_tensor(n, s, dtype, seed, std, layers) for n, s in group}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
        weight_map.update({n: file for n, _ in group})
        sizes[file] = (out / file).stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sizes
