"""AIMET encodings (1.0.0 and 0.6.1): rendering, the schema each version must meet, and the
integer layout the QDQ graph gets from a weight grid."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from pipeline.engine.errors import KilnError
from pipeline.qnn.quant import algorithms, encodings
from pipeline.qnn.quant.encodings import encoding_from_grid
from pipeline.qnn.quant.grid import Grid
from pipeline.qnn.quant.model import quant_param
from pipeline.qnn.quant.qdq import dequantize

ACT = encoding_from_grid("/blocks.0/attn/Add_output_0", 16, False, [0.002], [31000], qmin=0)
W8 = encoding_from_grid("blocks.0.attn.q.conv.weight", 8, True, [0.01, 0.02], [0, 0], qmin=-128)
W4B = encoding_from_grid("blocks.0.mlp.up.conv.weight", 4, True, [0.1] * 4, [0] * 4, qmin=-8, block_size=64)
ARGS = {"activation_bitwidth": 16, "param_bitwidth": 8}


def test_offsets_follow_aimet_convention():
    assert ACT.offset == (-31000,) and ACT.enc_type == "PER_TENSOR"
    assert W8.offset == (-128, -128) and W8.enc_type == "PER_CHANNEL"   # symmetric int8: unsigned q, offset -128
    assert W4B.offset == (-8,) * 4 and W4B.enc_type == "PER_BLOCK"


def test_v1_renders_and_validates():
    doc = encodings.render([ACT], [W8, W4B], "1.0.0", ARGS)
    assert encodings.validate(json.loads(json.dumps(doc)), "x.json") == "1.0.0"
    act = doc["activation_encodings"][0]
    assert act == {"name": ACT.name, "bw": 16, "dtype": "INT", "enc_type": "PER_TENSOR", "is_sym": False,
                   "scale": [0.002], "offset": [-31000]}
    assert doc["param_encodings"][1]["block_size"] == 64


def test_v061_renders_and_validates():
    doc = encodings.render([ACT], [W8], "0.6.1", ARGS)
    assert encodings.validate(doc, "x.json") == "0.6.1"
    w = doc["param_encodings"][W8.name]
    assert len(w) == 2 and w[1]["is_symmetric"] == "True"
    assert w[1]["min"] == pytest.approx(-128 * 0.02) and w[1]["max"] == pytest.approx(127 * 0.02)
    a = doc["activation_encodings"][ACT.name][0]
    assert a["min"] == pytest.approx(-62.0) and a["max"] == pytest.approx(0.002 * (65535 - 31000))


def test_v061_cannot_hold_per_block_weights():
    with pytest.raises(KilnError, match="0.6.1 cannot express per-block.*blocks.0.mlp.up.conv.weight.*1.0.0"):
        encodings.render([ACT], [W4B], "0.6.1", ARGS)


def test_unknown_version_is_refused():
    with pytest.raises(KilnError, match="unknown encodings version '2.1'"):
        encodings.render([ACT], [W8], "2.1", ARGS)
    with pytest.raises(KilnError, match="f.json: version: '9' is not an encodings version"):
        encodings.validate({"version": "9"}, "f.json")


def _broken(mutate) -> dict:
    doc = copy.deepcopy(encodings.render([ACT], [W8], "1.0.0", ARGS))
    mutate(doc)
    return doc


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["param_encodings"][0]["offset"].pop(), r"param_encodings\.0: .*2 scales but 1 offsets"),
    (lambda d: d["param_encodings"][0].update(offset=[-127, -128]), "symmetric encoding has offset -128"),
    (lambda d: d["activation_encodings"][0].update(scale=[0.0]), r"activation_encodings\.0\.scale\.0: .*greater than 0"),
    (lambda d: d["activation_encodings"][0].update(bogus=1), r"activation_encodings\.0\.bogus: Extra inputs"),
    (lambda d: d["activation_encodings"][0].update(offset=[5]), r"offsets must lie in \[-65535, 0\]"),
    (lambda d: d["param_encodings"][0].update(block_size=64), "block_size goes with PER_BLOCK/LPBQ only"),
    (lambda d: d["param_encodings"].append(dict(d["param_encodings"][0])), "duplicate names"),
    (lambda d: d.pop("param_encodings"), r"param_encodings: Field required"),
])
def test_v1_schema_rejects(mutate, message):
    with pytest.raises(KilnError, match=r"enc\.json: .*" + message):
        encodings.validate(_broken(mutate), "enc.json")


def test_v061_schema_rejects_inconsistent_min():
    doc = encodings.render([ACT], [W8], "0.6.1", ARGS)
    doc["activation_encodings"][ACT.name][0]["min"] = -1.0
    with pytest.raises(KilnError, match=r"enc\.json: activation_encodings\..*min -1.0 != scale \* offset"):
        encodings.validate(doc, "enc.json")


@pytest.mark.parametrize("grid,shape", [
    (Grid(8, "per-channel"), (16, 128, 1, 1)),
    (Grid(4, "per-block", 64), (16, 128, 1, 1)),
    (Grid(4, "per-channel"), (16, 128, 1, 1)),
    (Grid(8, "per-tensor", symmetric=False), (16, 128)),
    (Grid(16, "per-tensor"), (128,)),
])
def test_quant_param_dequantizes_to_the_fake_quantized_weight(grid, shape):
    torch.manual_seed(0)
    w = torch.randn(shape[0], 128) if len(shape) > 1 else torch.randn(128) + 1
    w2 = w.reshape(w.shape[0], -1) if w.ndim > 1 else w[None]
    wq, scale, zero = algorithms.rtn(w2, grid)
    p = quant_param("t", w, grid, scale, zero, shape)
    assert p.codes.shape == shape
    assert p.codes.min() >= grid.qmin and p.codes.max() <= grid.qmax
    np.testing.assert_allclose(dequantize(p).reshape(wq.shape), wq.numpy(), rtol=0, atol=1e-6)
    assert len(p.encoding.scale) == scale.numel()
    assert encodings.validate(encodings.render([], [p.encoding], "1.0.0", ARGS), "p.json") == "1.0.0"
