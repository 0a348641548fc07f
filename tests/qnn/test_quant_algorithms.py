"""PTQ algorithms on toy layers whose optimum is known."""
from __future__ import annotations

import pytest
import torch

from pipeline.qnn.quant.algorithms import RATIOS, gptq, hessian, mse, rtn, seqmse
from pipeline.qnn.quant.grid import Grid, quantize, scale_zero

GRIDS = [Grid(4, "per-channel"), Grid(4, "per-block", 8), Grid(8, "per-tensor"), Grid(4, "per-channel", symmetric=False)]


def out_err(w, wq, x):
    return ((x @ (w - wq).T) ** 2).sum().item()


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g.bits}b-{g.granularity}-{'sym' if g.symmetric else 'asym'}")
def test_weights_on_the_grid_are_reproduced_exactly(grid):
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    g = grid.groups(w)
    scale, zero = scale_zero(g, grid)
    on_grid = ((quantize(g, scale, zero, grid) - zero) * scale).reshape(w.shape)  # already representable
    x = torch.randn(32, 16)
    for algo in (lambda v: rtn(v, grid), lambda v: mse(v, grid),
                 lambda v: seqmse(v, grid, hessian(x)), lambda v: gptq(v, grid, hessian(x))):
        assert torch.allclose(algo(on_grid)[0], on_grid, atol=1e-5)


def test_symmetric_grid_codes_and_offsets():
    grid = Grid(8)
    assert (grid.qmin, grid.qmax) == (-128, 127) and (Grid(4, symmetric=False).qmin, Grid(4, symmetric=False).qmax) == (0, 15)
    w = torch.tensor([[1.0, -0.5, 0.25, 0.0]])
    wq, scale, zero = rtn(w, grid)
    assert torch.allclose(scale.flatten(), torch.tensor([1 / 127])) and zero.abs().sum() == 0
    assert torch.allclose(wq, w, atol=0.5 / 127)


def test_mse_clips_gaussian_weights_below_their_max():
    # For Gaussian weights the 4-bit optimum clips near 2.5 sigma, well inside the sample max (~3.3 sigma).
    torch.manual_seed(0)
    w = torch.randn(16, 1024)
    grid = Grid(4)
    wq, scale, _ = mse(w, grid)
    err_rtn, err_mse = ((rtn(w, grid)[0] - w) ** 2).sum(), ((wq - w) ** 2).sum()
    assert err_mse < 0.9 * err_rtn
    clip = (scale.flatten() * grid.qmax).mean().item()
    assert 2.0 < clip < 3.0


def test_seqmse_ignores_an_input_that_is_never_active():
    torch.manual_seed(0)
    w = torch.randn(4, 64) * 0.1
    w[:, 5] = 2.0          # large weights on input 5...
    x = torch.randn(256, 64)
    x[:, 5] = 0.0          # ...which never carries signal: the optimum clips it away
    grid = Grid(4)
    e_rtn, e_mse, e_seq = (out_err(w, a[0], x) for a in (rtn(w, grid), mse(w, grid), seqmse(w, grid, hessian(x), RATIOS)))
    ideal = w.clone()
    ideal[:, 5] = 0.0  # the known optimum: quantize as if input 5 did not exist
    e_opt = out_err(w, rtn(ideal, grid)[0], x)
    assert e_seq < e_mse and e_seq < 0.2 * e_rtn
    assert e_seq <= 1.1 * e_opt


def test_gptq_equals_rtn_when_inputs_are_uncorrelated():
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    x = torch.eye(32) * 3.0  # H diagonal: no error can be moved to other columns
    grid = Grid(4, "per-block", 8)
    assert torch.allclose(gptq(w, grid, hessian(x), damp=0.0)[0], rtn(w, grid)[0], atol=1e-6)


def test_gptq_compensates_through_correlated_inputs():
    torch.manual_seed(0)
    base = torch.randn(512, 16)
    x = torch.cat([base, base + 0.01 * torch.randn(512, 16)], dim=1)  # every input has a near twin
    w = torch.randn(8, 32)
    grid = Grid(3, "per-channel")
    e_rtn, e_gptq = out_err(w, rtn(w, grid)[0], x), out_err(w, gptq(w, grid, hessian(x))[0], x)
    # the first 16 columns' errors move onto their twins, the last 16 have nowhere to go:
    # about half of RTN's error remains
    assert e_gptq < 0.6 * e_rtn


def test_block_size_must_divide_width():
    with pytest.raises(ValueError, match="does not divide"):
        Grid(4, "per-block", 128).groups(torch.zeros(4, 576))


def test_blocks_that_do_not_divide_the_input_width_fall_back_to_per_channel():
    from pipeline.qnn.quant.model import grid_for

    scheme = {"weights": {"bits": 4, "granularity": "per-block", "block_size": 128, "symmetric": True},
              "overrides": [{"match": "lm_head", "weights": {"bits": 8, "granularity": "per-channel"}}]}
    assert grid_for("model.layers.0.mlp.down_proj.weight", scheme, (576, 1536)) == Grid(4, "per-block", 128)
    assert grid_for("model.layers.0.mlp.up_proj.weight", scheme, (1536, 576)) == Grid(4, "per-channel", None)
    assert grid_for("lm_head.weight", scheme, (49152, 576)) == Grid(8, "per-channel", None)
    assert grid_for("model.norm.weight", scheme, (576,)) == Grid(16, "per-tensor", None)


@pytest.mark.parametrize("algorithm", ["gptq", "seqmse", "rtn"])
@pytest.mark.parametrize("granularity", ["per-block", "per-channel", "per-tensor"])
def test_a_weight_calibrated_in_row_chunks_equals_it_calibrated_whole(monkeypatch, algorithm, granularity):
    """Rows never interact (ranges per row or per group, GPTQ's error spread along rows), so the row
    chunks a large weight is cut into (the LM head) give the same codes, scales and zero points;
    a per-tensor range is never cut."""
    from pipeline.qnn.quant import model

    torch.manual_seed(0)
    x = torch.randn(256, 64) * torch.linspace(0.1, 3, 64)
    grid = Grid(4, granularity, symmetric=False, block_size=16 if granularity == "per-block" else None)

    def run(chunk_elements: int) -> dict:
        monkeypatch.setattr(model, "CHUNK_ELEMENTS", chunk_elements)
        torch.manual_seed(1)
        linear = torch.nn.Linear(64, 40, bias=False)
        return model._quantize_one("l", linear, grid, algorithm, hessian(x), "cpu") | {"w": linear.weight.data}

    whole, chunked = run(1 << 30), run(7 * 64)  # 7 rows a chunk: 40 rows in 6 chunks, the last short
    assert torch.allclose(whole["w"], chunked["w"], rtol=0, atol=1e-6)
    assert torch.equal(whole["scale"], chunked["scale"]) and torch.equal(whole["zero"], chunked["zero"])
    assert whole["sqnr_db"] == chunked["sqnr_db"]
