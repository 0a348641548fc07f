"""SeqMSE/GPTQ calibrate layer by layer: layer i sees what the already-quantized layers hand it."""
from __future__ import annotations

import copy

import pytest
import torch
from test_export_onnx import tiny_hf

from pipeline.qnn.quant import algorithms
from pipeline.qnn.quant.model import HessianTap, quantize_weights

SCHEME = {"weights": {"bits": 3, "granularity": "per-channel", "symmetric": True}, "overrides": []}
BATCHES = [torch.tensor([[5, 9, 17, 3, 44, 2, 90, 7]]), torch.tensor([[1, 60, 61, 12, 8]])]


def hessians_of(model, names):
    modules = dict(model.named_modules())
    with HessianTap({n: modules[n] for n in names}) as tap, torch.no_grad():
        for ids in BATCHES:
            model(ids, use_cache=False)
    return tap.h


@pytest.mark.parametrize("algorithm", ["seqmse", "gptq"])
def test_layer_inputs_come_from_the_quantized_layers_before_it(algorithm, monkeypatch):
    hf = tiny_hf()
    original = copy.deepcopy(hf)
    seen = {}
    real = algorithms.seqmse

    def spy(w, grid, h, *args):
        seen.setdefault((*w.shape, round(w.sum().item(), 4)), h.clone())
        return real(w, grid, h, *args)

    monkeypatch.setattr(algorithms, "seqmse", spy)
    rows = quantize_weights(hf, SCHEME, algorithm, BATCHES)
    assert len(rows) == 2 * 7 + 1  # every projection of both layers, and the LM head (tied embeddings)

    # layer 1's inputs on a model whose layer 0 alone holds the quantized weights
    half = copy.deepcopy(original)
    half.model.layers[0].load_state_dict(hf.model.layers[0].state_dict())
    q1 = "model.layers.1.self_attn.q_proj"
    expected = hessians_of(half, [q1])[q1]
    w = original.get_submodule(q1).weight.float()
    got = seen[(*w.shape, round(w.sum().item(), 4))]
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    # ...which differ from the float model's (so the check above can tell)
    assert not torch.allclose(hessians_of(original, [q1])[q1], expected, rtol=1e-3)


def test_hessian_tap_counts_a_shared_input_once_per_module():
    hf = tiny_hf()
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    h = hessians_of(hf, names)
    assert torch.equal(h[names[0]], h[names[1]]) and torch.equal(h[names[1]], h[names[2]])
    x = []
    handle = hf.get_submodule(names[0]).register_forward_hook(lambda m, a, o: x.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        for ids in BATCHES:
            hf(ids, use_cache=False)
    handle.remove()
    assert torch.allclose(h[names[0]], algorithms.hessian(torch.cat(x)), rtol=1e-5, atol=1e-6)
