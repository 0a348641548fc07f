"""SeqMSE/GPTQ calibrate layer by layer: layer i sees what the already-quantized layers hand it."""
from __future__ import annotations

import copy

import pytest
import torch
from test_export_onnx import tiny_hf

from pipeline.qnn.quant import algorithms
from pipeline.qnn.quant.checkpoint import LayerCheckpoints
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


class Killed(Exception):
    """Stands in for the process dying in the middle of a layer."""


@pytest.mark.parametrize("algorithm", ["seqmse", "gptq"])
def test_a_calibration_killed_mid_layer_resumes_with_identical_results(algorithm, tmp_path, monkeypatch):
    from pipeline.qnn.quant import model as quant_model

    cfg = {"num_hidden_layers": 3}
    straight = tiny_hf(**cfg)
    want = quantize_weights(straight, SCHEME, algorithm, BATCHES)

    ckpt = tmp_path / "calibration"
    real = quant_model._quantize_one
    calls = []

    def dies_in_layer_2(name, *args):
        calls.append(name)
        if name.startswith("model.layers.2.") and name.endswith("v_proj"):
            raise Killed
        return real(name, *args)

    monkeypatch.setattr(quant_model, "_quantize_one", dies_in_layer_2)
    with pytest.raises(Killed):
        quantize_weights(tiny_hf(**cfg), SCHEME, algorithm, BATCHES, checkpoint=ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == ["layer-0000.safetensors", "layer-0001.safetensors",
                                                     "states.safetensors"]
    monkeypatch.setattr(quant_model, "_quantize_one", lambda name, *args: calls.append(name) or real(name, *args))
    calls.clear()
    resumed_model = tiny_hf(**cfg)
    got = quantize_weights(resumed_model, SCHEME, algorithm, BATCHES, checkpoint=ckpt)
    # only layer 2 and the LM head were calibrated again
    assert calls and all(n.startswith("model.layers.2.") or n == "lm_head" for n in calls)
    assert [r["name"] for r in got] == [r["name"] for r in want]
    for a, b in zip(got, want, strict=True):
        assert a["grid"] == b["grid"] and a["sqnr_db"] == b["sqnr_db"]
        assert torch.equal(a["scale"], b["scale"]) and torch.equal(a["zero"], b["zero"])
    for (name, p), q in zip(resumed_model.state_dict().items(), straight.state_dict().values(), strict=True):
        assert torch.equal(p, q), name

    # a checkpoint of another calibration (other prompts) is not used
    other = LayerCheckpoints(ckpt, {"different": True})
    assert other.last_layer() == -1


def test_a_truncated_checkpoint_is_ignored_not_fatal(tmp_path):
    ckpt = tmp_path / "calibration"
    quantize_weights(tiny_hf(), SCHEME, "seqmse", BATCHES, checkpoint=ckpt)
    fingerprint = {"algorithm": "seqmse", "scheme": SCHEME, "device": "cpu", "prompts": [8, 5], "layers": 2}
    assert LayerCheckpoints(ckpt, fingerprint).last_layer() == 1
    layer = ckpt / "layer-0000.safetensors"
    layer.write_bytes(layer.read_bytes()[:40])  # a power cut mid-write of a file the rename had put in place
    assert LayerCheckpoints(ckpt, fingerprint).last_layer() == -1
    again = quantize_weights(tiny_hf(), SCHEME, "seqmse", BATCHES, checkpoint=ckpt)  # starts over, completes
    assert len(again) == 2 * 7 + 1 and LayerCheckpoints(ckpt, fingerprint).last_layer() == 1
