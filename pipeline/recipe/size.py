"""How big a recipe's model is, read cheaply at plan time (a config.json, no weights), and what
the heavy stages are expected to hold in memory at that size.

Planning data only: nothing here enters a key. The factors are bytes of peak RSS per parameter
(plus a fixed base for the interpreter and libraries), measured on the shape rehearsals at 1B
and 8B (docs/benchmarks.md#stage-costs-at-real-size); they let the runner keep two stages that
do not fit together from running at once.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe

GB = 1 << 30

# stage → (base bytes, bytes per parameter)
PEAK = {
    "model.synthetic": (3 * GB, 0.0),     # one shard at a time
    "model": (1 * GB, 8.0),               # fp32 load + save copy
    "qnn.export": (2 * GB, 8.0),
    "qnn.quantize": (3 * GB, 7.0),        # 11.3 GB at 1.236B (the activation-range pass)
    "llamacpp.convert": (2 * GB, 0.5),    # lazy, memory-mapped
}


def _config(recipe: Recipe) -> dict[str, Any] | None:
    m = recipe.model
    if m.synthetic:
        path = recipe.resolve_path(m.synthetic.config)
    elif m.hf_dir:
        path = recipe.resolve_path(m.hf_dir) / "config.json"
    elif m.hub_id:
        from pipeline.generic.hfcache import snapshot

        snap = snapshot(m.hub_id, m.revision, "model")
        if snap is None:
            return None  # not downloaded: the model stage says how to provide it
        path = snap / "config.json"
    else:
        return None  # a GGUF (the embedded model too): its metadata is read only when the stage runs
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _shape(recipe: Recipe) -> dict[str, int] | None:
    """hidden, layers, vocab, KV width and parameters per decoder layer of a Llama-style config."""
    c = _config(recipe)
    try:
        h, i, layers, v = (int(c[k]) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
        heads = int(c["num_attention_heads"])
        kv = int(c.get("num_key_value_heads") or heads)
        head_dim = int(c.get("head_dim") or h // heads)
    except (TypeError, KeyError, ValueError, ZeroDivisionError):
        return None
    return {"hidden": h, "layers": layers, "vocab": v, "kv_width": kv * head_dim, "tied": int(bool(c.get("tie_word_embeddings"))),
            "per_layer": h * head_dim * (2 * heads + 2 * kv) + 3 * h * i + 2 * h}


def planned_layers(recipe: Recipe) -> int | None:
    shape = _shape(recipe)
    return shape["layers"] if shape else None


def planned_parameters(recipe: Recipe) -> int | None:
    """Parameters of a Llama-style decoder from its config (None when unknown here)."""
    s = _shape(recipe)
    return None if s is None else s["vocab"] * s["hidden"] * (2 - s["tied"]) + s["layers"] * s["per_layer"] + s["hidden"]


def htp_part_bytes(recipe: Recipe, parts: int) -> list[int] | None:
    """What each of `parts` parts would ask of HTP memory: its layers' weights at the scheme's
    weight bits and their KV cache at the context length (KV bits), the first part with the embedding
    table (16-bit codes: it is stored on its Gather output's grid) and the last with the LM head."""
    s = _shape(recipe)
    if s is None:
        return None
    size, extra = divmod(s["layers"], parts)
    weight_bits, kv_bits = recipe.scheme.weights.bits, recipe.scheme.kv_cache.bits
    kv_per_layer = 2 * s["kv_width"] * recipe.spec.context_length * kv_bits // 8
    out = [(size + (i < extra)) * (s["per_layer"] * weight_bits // 8 + kv_per_layer) for i in range(parts)]
    out[0] += s["vocab"] * s["hidden"] * 2
    out[-1] += s["vocab"] * s["hidden"] * weight_bits // 8
    return out


def peak_estimate(recipe: Recipe, what: str) -> int | None:
    n = planned_parameters(recipe)
    if n is None:
        return None
    base, per = PEAK[what]
    return int(base + per * n)


def streamed_float_peak(recipe: Recipe) -> int | None:
    """The float reference run one decoder layer at a time (pipeline/generic/layers.py): the
    interpreter, the embedding and LM head in float32, one layer and a window's logits."""
    s = _shape(recipe)
    if s is None:
        return None
    tables = s["vocab"] * s["hidden"] * (2 - s["tied"])
    window = recipe.spec.eval.perplexity.window
    return int(2 * GB + 4 * (tables + s["per_layer"] + 3 * window * s["vocab"]))
