"""The sim holds quantized weights as codes and dequantizes them where an op reads them: the values
are bit-identical to DequantizeLinear's (qdq.dequantize), the sim's outputs bit-identical to a sim
on float copies, and no float copy of a quantized weight is left in the sim or the HF model."""
from __future__ import annotations

import copy

import pytest
import torch
from test_export_onnx import tiny_hf

from pipeline.qnn.adapted_llama import AdaptedLlama, hf_names, run_steps
from pipeline.qnn.quant import qdq
from pipeline.qnn.quant.coded import CodedConv, CodedWeight, hold_as_codes
from pipeline.qnn.quant.flow import calibrated_sim, quantize_model
from pipeline.qnn.quant.grid import Grid, scale_zero
from pipeline.qnn.quant.model import quant_param
from pipeline.qnn.quant.sim import QuantSim

IDS = [5, 9, 17, 3, 44, 2, 90, 7, 61, 12]
SCHEME = {"weights": {"bits": 4, "granularity": "per-block", "block_size": 16, "symmetric": True},
          "activations": 16, "kv_cache": 8,
          "overrides": [{"match": "embed", "weights": {"bits": 8, "granularity": "per-channel", "symmetric": False}}]}


@pytest.mark.parametrize("grid", [Grid(4, "per-block", 16), Grid(4, "per-channel", None),
                                  Grid(8, "per-tensor", None, symmetric=False), Grid(8, "per-block", 8, False)])
@pytest.mark.parametrize("shape", [(40, 64, 1, 1), (40, 64)])
def test_coded_weight_dequantizes_bit_for_bit_like_dequantize_linear(grid, shape):
    torch.manual_seed(0)
    w = torch.randn(40, 64) * torch.linspace(0.05, 4, 64)
    scale, zero = scale_zero(grid.groups(w), grid)
    p = quant_param("w", w, grid, scale, zero, shape)
    want = qdq.dequantize(p)
    coded = CodedWeight(p)
    assert torch.equal(coded(), torch.from_numpy(want))
    rows = torch.tensor([7, 0, 39, 7])
    assert torch.equal(coded(rows), torch.from_numpy(want[rows.numpy()]))
    assert torch.equal(coded.codes, torch.from_numpy(p.codes))  # dequantizing never writes the codes


def test_calibrated_sim_on_codes_computes_what_a_sim_on_float_copies_does():
    hf = tiny_hf()
    reference_hf = copy.deepcopy(hf)
    shapes = {n: tuple(t.shape) for n, t in AdaptedLlama(hf).named_parameters()}
    _, params, _ = quantize_model(hf, SCHEME, "rtn", [IDS], shapes, "cpu")
    assert {"embed.weight", "lm_head.conv.weight", "blocks.0.mlp.down.conv.weight"} <= set(params)

    sim = calibrated_sim(hf, params, SCHEME, [IDS], 4, 16)
    # the reference: the same sim on float copies of the dequantized weights
    model = AdaptedLlama(reference_hf).eval()
    for name, p in params.items():
        param = model.get_parameter(name)
        param.data = torch.from_numpy(qdq.dequantize(p)).reshape(param.shape).clone()
    reference = QuantSim(model, SCHEME["activations"], SCHEME["kv_cache"], float("inf"))
    run_steps(reference.step(), reference_hf, IDS, 4, 16)
    reference.freeze()

    assert [q.frozen for q in sim.acts] == [q.frozen for q in reference.acts]
    assert sim.kv_encodings() == reference.kv_encodings()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5]
    assert torch.equal(run_steps(sim.step(), hf, prompt, 4, 16), run_steps(reference.step(), reference_hf, prompt, 4, 16))

    # no float copy of a quantized weight: not in the sim, not in the HF model
    quantized = {tuple(p.codes.shape) for n, p in params.items() if p.codes.ndim > 1}
    assert not [n for n, t in sim.model.named_parameters() if tuple(t.shape) in quantized]
    names = hf_names(hf.config.num_hidden_layers)
    assert all(hf.get_parameter(names[n]).numel() == 0 for n in params)
    assert sum(isinstance(m, CodedConv) for m in sim.model.modules()) == 2 * 7 + 1


def test_hold_as_codes_refuses_codes_of_another_shape():
    model = AdaptedLlama(tiny_hf()).eval()
    w, grid = torch.randn(64, 128), Grid(8, "per-channel", None)
    p = quant_param("x", w, grid, *scale_zero(grid.groups(w), grid), (64, 128, 1, 1))
    with pytest.raises(ValueError, match=r"blocks.0.attn.q.conv.weight: codes of shape \(64, 128, 1, 1\)"):
        hold_as_codes(model, {"blocks.0.attn.q.conv.weight": p})
