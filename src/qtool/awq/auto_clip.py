"""AWQ clip search: per output channel and group, how far to shrink the weight range
before quantization so that the linear's output error is smallest.

The candidate bounds are ``ratio * max|w|`` of the group, ``ratio`` from 1 (no clip) down
to ``1 - max_shrink`` in ``grid`` steps; the bound is what ``rtn_quantize`` gets as
``clip_max``. The objective is the linear's output error on the search tokens,
``||dW X^T||^2 = sum_rows d H d^T`` with ``H = X^T X`` and ``d`` a row of ``W - Q(W)``.

A per-group search (as in the paper's code) scores each group on its own block of ``H``
and ignores how the errors of a row's groups correlate through ``H``. Here the search is
exact coordinate descent on each row's full quadratic: groups are visited in order, and
each takes the candidate that lowers the whole row's error most given the choices made
so far, with the residual ``r = d H`` kept up to date (one ``[b, g] @ [g, k]`` product per
group). Every candidate of every group is fake-quantized up front in one batched call.
Starting from no clip and accepting only decreases, no row's output error on the search
tokens can grow; a final check with a small margin keeps that true despite float32
rounding. Rows go in batches, so memory stays near ``BATCH_ELEMENTS`` floats besides ``H``.
"""

from __future__ import annotations

import torch

from qtool.awq.fake_quant import fake_quantize_groups

BATCH_ELEMENTS = 1 << 24
# A clipped row must lower its error by this relative margin, far above float32 rounding
# of the quadratic form, so "never worse than no clip" holds in exact arithmetic too.
MIN_GAIN = 1e-5


def clip_ratios(grid: int, max_shrink: float) -> torch.Tensor:
    """float32 ``[grid + 1]``: ``1, 1 - max_shrink / grid, ..., 1 - max_shrink``."""
    return 1.0 - max_shrink * torch.arange(grid + 1, dtype=torch.float32) / grid


def search_clip(weight: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int, sym: bool,
                grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """Per-group clip bounds for one linear.

    Args:
        weight: float ``[n, k]`` (already scaled by AWQ, if it was).
        gram: float32 ``[k, k]``, ``X^T X`` of the linear's (scaled) input.
        bits, group_size, sym: the final quantization's parameters.
        grid: candidate steps between no clip and ``1 - max_shrink``.
        max_shrink: largest fraction of the range that may be clipped, in ``[0, 1)``.

    Returns:
        ``clip_max`` float32 ``[n, G]``: the absolute bound per row and group for
        ``rtn_quantize`` (the group's max |w| where clipping does not help).
    """
    assert 0.0 <= max_shrink < 1.0 and grid >= 1
    w_all = weight.detach().float()
    n, k = w_all.shape
    g = k if group_size == -1 else group_size
    num_groups = k // g
    h = gram.to(w_all.device, torch.float32)
    ratios = clip_ratios(grid, max_shrink).to(w_all.device)  # [C]
    c = ratios.numel()
    absmax = w_all.reshape(n, num_groups, g).abs().amax(dim=-1)  # [n, G]
    best_ratio = torch.ones(n, num_groups, device=w_all.device)
    batch = max(1, BATCH_ELEMENTS // (c * k))
    for start in range(0, n, batch):
        rows = slice(start, min(start + batch, n))
        w = w_all[rows].reshape(-1, num_groups, g)  # [b, G, g]
        b = w.shape[0]
        bounds = ratios[:, None, None, None] * absmax[rows][None, :, :, None]  # [C, b, G, 1]
        err = w - fake_quantize_groups(w.expand(c, b, num_groups, g), bits, sym, bounds)  # [C, b, G, g]
        d = err[0].clone()  # [b, G, g]: no clip (ratio 1 leaves every weight inside the bound)
        resid = d.reshape(b, k) @ h  # [b, k]
        before = (resid * d.reshape(b, k)).sum(-1)  # [b]
        pick = torch.zeros(b, num_groups, dtype=torch.long, device=w.device)
        index = torch.arange(b, device=w.device)
        for gi in range(num_groups):
            cols = slice(gi * g, (gi + 1) * g)
            delta = err[:, :, gi] - d[:, gi]  # [C, b, g]; delta[0] == 0
            change = (delta * (delta @ h[cols, cols] + 2.0 * resid[:, cols])).sum(-1)  # [C, b]
            best_change, best = change.min(dim=0)  # [b]
            best = torch.where(best_change < 0, best, torch.zeros_like(best))
            step = delta[best, index]  # [b, g]
            d[:, gi] = err[best, index, gi]
            resid += step @ h[cols, :]
            pick[:, gi] = best
        chosen = d.reshape(b, k)
        after = ((chosen @ h) * chosen).sum(-1)
        better = after < before * (1.0 - MIN_GAIN)
        best_ratio[rows] = torch.where(better[:, None], ratios[pick], best_ratio[rows])
    return best_ratio * absmax
