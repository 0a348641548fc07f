"""Weight PTQ algorithms. Each takes a weight W [out, in] (a Linear's or a 1x1 Conv's) and
returns (fake-quantized W, scale, zero point) on `grid`.

- rtn:    round to nearest with min-max ranges.
- mse:    per-group range shrink factor minimizing the weight's squared error.
- seqmse: per-group shrink factor minimizing the layer *output* error on calibration
          inputs X [n, in] (SeqMSE, as in AIMET: ranges judged by what the layer computes).
- gptq:   GPTQ (Frantar et al. 2022): quantize columns one by one and spread each column's
          error over the not-yet-quantized columns through the inverse Hessian H = 2 XᵀX.
Both calibrated ones see the inputs only through H = XᵀX (`hessian`), accumulated over
any number of calibration tokens.
"""
from __future__ import annotations

import torch

from pipeline.qnn.quant.grid import Grid, fake_quant, scale_zero

RATIOS = torch.linspace(0.05, 1.0, 96)  # range shrink factors tried per group (1.0 = min-max)
# SeqMSE evaluates the layer output per candidate: a coarser grid keeps it affordable on CPU.
SEQMSE_RATIOS = torch.linspace(0.3, 1.0, 29)


def rtn(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = grid.groups(w)
    scale, zero = scale_zero(g, grid)
    return fake_quant(g, scale, zero, grid).reshape(w.shape), scale, zero


def _search(w: torch.Tensor, grid: Grid, loss, ratios: torch.Tensor = RATIOS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group ratio from `ratios` that minimizes loss(groups_q) -> per-group error [out, n_groups]."""
    g = grid.groups(w)
    best_err = torch.full(g.shape[:2], float("inf"), device=g.device)
    best_scale, best_zero = scale_zero(g, grid)
    for r in ratios:
        scale, zero = scale_zero(g, grid, float(r))
        err = loss(fake_quant(g, scale, zero, grid))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better[..., None], scale, best_scale)
        best_zero = torch.where(better[..., None], zero, best_zero)
    return fake_quant(g, best_scale, best_zero, grid).reshape(w.shape), best_scale, best_zero


def mse(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = grid.groups(w)
    return _search(w, grid, lambda gq: ((gq - g) ** 2).sum(-1))


def hessian(x: torch.Tensor) -> torch.Tensor:
    """XᵀX of calibration inputs X [n, in]: all SeqMSE and GPTQ need to know about them."""
    x = x.double()
    return x.T @ x


def seqmse(w: torch.Tensor, grid: Grid, h: torch.Tensor,
           ratios: torch.Tensor = SEQMSE_RATIOS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ranges chosen per group by the output error ||X Wᵀ - X Wqᵀ||² restricted to that group's inputs:
    for output o and group k that is Δ_ok H_kk Δ_okᵀ with H = XᵀX, so any number of calibration
    rows costs the same."""
    g = grid.groups(w)
    h = h.to(w.dtype)
    if grid.granularity == "per-tensor":
        def total_error(gq: torch.Tensor) -> torch.Tensor:
            d = (gq - g).reshape(w.shape)
            return ((d @ h) * d).sum().reshape(1, 1)
        return _search(w, grid, total_error, ratios)
    n_groups, size = g.shape[1], g.shape[2]
    blocks = torch.stack([h[k * size:(k + 1) * size, k * size:(k + 1) * size] for k in range(n_groups)])

    def output_error(gq: torch.Tensor) -> torch.Tensor:
        d = gq - g
        return (torch.einsum("oks,kst->okt", d, blocks) * d).sum(-1)

    return _search(w, grid, output_error, ratios)


def gptq(w: torch.Tensor, grid: Grid, h: torch.Tensor, ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
         damp: float = 0.01, block: int = 128, act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ with group ranges fixed up front (`ranges` = (scale, zero) per group, min-max of W when
    None) so they match an exported encoding ("static groups"), columns visited in decreasing
    H_jj order (act-order: the most active inputs first, while most columns can still absorb
    their error)."""
    w = w.clone().double()
    out, inp = w.shape
    g = grid.groups(w)
    scale, zero = ranges if ranges is not None else scale_zero(g, grid)
    col_scale, col_zero = (t.expand(g.shape).reshape(w.shape) for t in (scale, zero))  # per weight
    h = h.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(inp, dtype=h.dtype, device=h.device)
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(inp, device=h.device)
    w, h, col_scale, col_zero = w[:, order], h[order][:, order], col_scale[:, order], col_zero[:, order]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i0 in range(0, inp, block):
        i1 = min(i0 + block, inp)
        w_blk, err_blk, hinv_blk = w[:, i0:i1].clone(), torch.zeros(out, i1 - i0, dtype=w.dtype,
                                                                    device=w.device), hinv[i0:i1, i0:i1]
        for j in range(i1 - i0):
            col, d = w_blk[:, j], hinv_blk[j, j]
            s, z = col_scale[:, i0 + j], col_zero[:, i0 + j]
            qcol = (torch.clamp(torch.round(col / s) + z, grid.qmin, grid.qmax) - z) * s
            q[:, i0 + j] = qcol
            err = (col - qcol) / d
            w_blk[:, j:] -= err[:, None] * hinv_blk[j, j:][None, :]
            err_blk[:, j] = err
        w[:, i1:] -= err_blk @ hinv[i0:i1, i1:]
    q = q[:, torch.argsort(order)]
    return q.float(), scale.float(), zero.float()
