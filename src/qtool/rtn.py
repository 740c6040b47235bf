"""Round-to-nearest (min-max) quantization primitives and the RTN method.

These primitives are shared by every method: GPTQ calls ``group_qparams`` as its solver
reaches each group and ``quantize_to_codes`` column by column; AWQ quantizes its scaled,
clipped weights with ``rtn_quantize``.

Codes are computed with the exact float32 scale; the scale is then stored as float16 and
every dequantization (the write-back into the model, GPTQ's error feedback, every reader)
uses that stored float16 value, so the checkpoint reproduces exactly the weight the method
wrote back. Where all codes of a group are known before the scale is stored (RTN, AWQ),
the stored value is whichever float16 neighbour of the exact scale reproduces the group
better (``fit_storage_scale``). Rounding the scale to float16 *before* choosing codes looks tidier but shifts
rounding ties systematically: on SmolLM2 (whose weights sit on a Q4_1 grid) it cost 0.9
perplexity for symmetric RTN (26.85 -> 27.72 on 8 WikiText-2 windows).

A group's range is its min-max range (``--scale-search minmax``), or, with
``--scale-search mse``, the min-max range shrunk by whichever ratio of a grid
(``shrink_ratios``: 1, 0.99, ..., 0.75 by default) reproduces the group with the smallest
(optionally importance-weighted) squared error (``mse_qparams``; GPTQ's ``mse`` option,
llama.cpp's scale search): clipping a few outliers buys a finer step for all the others.
"""

from __future__ import annotations

import torch

from qtool.layer_error import layer_errors
from qtool.qtensor import QuantizedWeight


def group_qparams(w: torch.Tensor, bits: int, sym: bool, ratios: torch.Tensor | None = None,
                  importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for each row of ``w``: min-max, or the MSE-best shrink of it.

    Args:
        w: float ``[n, m]``, the weights of one group (or, min-max only, clip-bounded
            ``[n, 2]`` ``(min, max)`` pairs: only the row min and max matter).
        bits: code width.
        sym: symmetric (zero = midpoint) or asymmetric.
        ratios: None for the min-max range; else the candidate shrink ratios of
            ``mse_qparams`` (``shrink_ratios``).
        importance: with ``ratios``, optional float ``[m]`` weight of each column's
            squared error (``mse_qparams``).

    Returns:
        ``(scale, zero)``: scale float32 ``[n]`` (exact; stored as float16 by
        ``storage_scale``), zero float32 ``[n]`` holding integers in ``0 .. 2**bits - 1``.
    """
    if ratios is not None:
        return mse_qparams(w, bits, sym, ratios, importance)
    wmin, wmax = _row_range(w)
    return minmax_qparams(wmin, wmax, bits, sym)


def _row_range(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``[n]`` row min and max of ``[n, m]``; the range always includes 0 so that
    exact zeros stay exact (as GPTQ and llm-compressor)."""
    w = w.float()
    return torch.clamp(w.amin(dim=1), max=0.0), torch.clamp(w.amax(dim=1), min=0.0)


def shrink_ratios(grid: int, max_shrink: float) -> torch.Tensor:
    """float32 ``[grid + 1]``: ``1, 1 - max_shrink / grid, ..., 1 - max_shrink``."""
    return 1.0 - max_shrink * torch.arange(grid + 1, dtype=torch.float32) / grid


def config_ratios(config) -> torch.Tensor | None:
    """The shrink ratios that ``config`` (a ``QuantizeConfig``) asks group parameters to
    search (``--scale-search mse``), or None for min-max."""
    if config.scale_search != "mse":
        return None
    return shrink_ratios(config.scale_grid, config.scale_max_shrink)


# candidates x rows x columns scored at once by ``mse_qparams`` (bounded memory)
MSE_BATCH_ELEMENTS = 1 << 22


def mse_qparams(w: torch.Tensor, bits: int, sym: bool, ratios: torch.Tensor,
                importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``w``, the shrink of its min-max range that reproduces it best.

    Candidate ``i`` is ``minmax_qparams(p_i * wmin, p_i * wmax)`` (``wmin <= 0 <= wmax``
    the row's range, symmetric: ``p_i * max|w|``), with its codes
    ``quantize_to_codes``; its error is ``sum_c importance[c] * (w[c] - dq[c])**2`` with
    ``dq`` the codes dequantized with the stored float16 scale (``dequantize_codes``),
    i.e. exactly what the checkpoint would hold. The first candidate with the smallest
    error wins, so with ``ratios[0] == 1`` a row is never reproduced worse than by
    min-max (which it keeps on ties). Deterministic.

    Args:
        w: float ``[n, m]``, the weights of one group per row.
        bits, sym: as ``group_qparams``.
        ratios: float ``[C]`` candidate ratios in ``(0, 1]`` (``shrink_ratios``).
        importance: optional float ``[m]``, non-negative weight of each column's error
            (None: all 1).

    Returns:
        ``(scale, zero)`` as ``group_qparams``.
    """
    w = w.float()
    n, m = w.shape
    wmin, wmax = _row_range(w)
    p = ratios.to(w.device, torch.float32)[:, None]  # [C, 1]
    scales, zeros = minmax_qparams(p * wmin, p * wmax, bits, sym)  # [C, n] each
    weight = None if importance is None else importance.to(w.device, torch.float32)
    best = torch.empty(n, dtype=torch.long, device=w.device)
    rows = max(1, MSE_BATCH_ELEMENTS // max(p.numel() * m, 1))
    for start in range(0, n, rows):
        part = slice(start, start + rows)
        s, z = scales[:, part, None], zeros[:, part, None]  # [C, b, 1]
        codes = quantize_to_codes(w[part], s, z, bits)  # [C, b, m]
        err = (dequantize_codes(codes, s, z) - w[part]).square_()
        if weight is not None:
            err = err * weight
        best[part] = err.sum(dim=-1).argmin(dim=0)  # the first minimum: the largest ratio on ties
    index = torch.arange(n, device=w.device)
    return scales[best, index], zeros[best, index]


def minmax_qparams(
    wmin: torch.Tensor, wmax: torch.Tensor, bits: int, sym: bool, maxq: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero from per-row ranges ``wmin <= 0 <= wmax`` (float ``[n]``)."""
    maxq = 2**bits - 1 if maxq is None else maxq
    if sym:
        amax = torch.maximum(wmin.abs(), wmax)
        wmin, wmax = -amax, amax
    dead = (wmin == 0) & (wmax == 0)
    wmin = torch.where(dead, -torch.ones_like(wmin), wmin)
    wmax = torch.where(dead, torch.ones_like(wmax), wmax)
    # a range so tiny that its float16 scale would underflow gets the smallest normal one
    scale = torch.clamp((wmax - wmin) / maxq, min=torch.finfo(torch.float16).tiny)
    if sym:
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        zero = torch.clamp(torch.round(-wmin / scale), 0, maxq)
    return scale, zero


def quantize_to_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Codes ``clamp(round(w / scale) + zero, 0, maxq)`` as float32 (same shape as ``w``);
    ``scale`` and ``zero`` broadcast against ``w``."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, 2**bits - 1)


def storage_scale(scale: torch.Tensor) -> torch.Tensor:
    """The float32 value of the float16 scale that is stored."""
    return scale.to(torch.float16).float()


def fit_storage_scale(
    w: torch.Tensor, codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """The float16 value to store for each row's exact ``scale``, given its codes.

    The exact scale lies between two float16 values; rounding to the nearer one is not
    always the one that reproduces the row better. With the codes and zero fixed, the row's
    squared error is a parabola in the scale, so this keeps whichever neighbour has the
    lower error (the nearer one on ties). Never worse than plain rounding, and a min-max
    scale to float16 precision.

    Args:
        w: float32 ``[rows, g]``, the (clipped) weights the codes were chosen from.
        codes, zero: float32 ``[rows, g]`` and ``[rows, 1]`` (or broadcastable).
        scale: float32 ``[rows]``, the exact scale the codes were chosen with.

    Returns:
        float32 ``[rows]`` holding float16-representable values.
    """
    near = scale.to(torch.float16)
    toward = torch.where(near.float() < scale, torch.full_like(near, float("inf")), torch.full_like(near, 0.0))
    other = torch.nextafter(near, toward)
    # stay a positive normal float16 (the floor group_qparams already applies)
    other = torch.where(other.float() < torch.finfo(torch.float16).tiny, near, other)
    # E(s) = |w|^2 - 2 s <w, d> + s^2 |d|^2 with d = codes - zero, so
    # E(o) - E(n) = (o - n) * ((o + n) |d|^2 - 2 <w, d>), in float64 per row
    d = codes - zero
    dd = (d * d).sum(dim=1, dtype=torch.float64)
    wd = (w * d).sum(dim=1, dtype=torch.float64)
    o, n = other.double(), near.double()
    gain = (o - n) * ((o + n) * dd - 2.0 * wd)
    return torch.where(gain < 0, other, near).float()


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(codes - zero) * stored scale`` in float32 (exact for 4/8-bit codes and fp16
    scales), i.e. what every reader of the checkpoint computes."""
    return (codes - zero) * storage_scale(scale)


def rtn_quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    bias: torch.Tensor | None = None,
    clip_max: torch.Tensor | None = None,
    fit_scale: bool = True,
    ratios: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Round-to-nearest quantization of one weight matrix.

    Args:
        weight: float ``[n, k]``.
        bits: 4 or 8.
        group_size: divides ``k``, or -1 for one group per row.
        sym: symmetric or asymmetric.
        bias: carried unchanged into the result.
        clip_max: optional float ``[n, G]`` absolute bound per group (AWQ clipping):
            the weights are clamped to ``[-clip_max, clip_max]`` before quantization.
        fit_scale: store, of the two float16 neighbours of each exact scale, the one
            that reproduces the group better (``fit_storage_scale``); False stores the
            nearest float16, as GPTQ must (its error feedback runs before a group's
            codes are all known).
        ratios: None for min-max group ranges, else the shrink ratios searched per
            group (``mse_qparams``, unweighted; ``config_ratios``).

    Returns:
        The canonical ``QuantizedWeight`` (contiguous groups, no ``g_idx``).
    """
    n, k = weight.shape
    g = k if group_size == -1 else group_size
    assert k % g == 0, (k, g)
    w = weight.detach().float().reshape(n, k // g, g)  # [n, G, g]
    if clip_max is not None:
        bound = clip_max.float().unsqueeze(-1)  # [n, G, 1]
        w = torch.maximum(torch.minimum(w, bound), -bound)
    flat = w.reshape(-1, g)  # [n*G, g]
    scale, zero = group_qparams(flat, bits, sym, ratios)
    codes = quantize_to_codes(flat, scale[:, None], zero[:, None], bits)
    if fit_scale:
        scale = fit_storage_scale(flat, codes, zero[:, None], scale)
    num_groups = k // g
    return QuantizedWeight(
        codes=codes.reshape(n, k).to(torch.uint8),
        scales=scale.reshape(n, num_groups).to(torch.float16),
        zeros=None if sym else zero.reshape(n, num_groups).to(torch.uint8),
        g_idx=None,
        bits=bits,
        group_size=group_size,
        sym=sym,
        bias=None if bias is None else bias.detach().clone(),
    )


def weight_error(weight: torch.Tensor, dequantized: torch.Tensor) -> float:
    """Relative squared error ``||W - W_q||^2 / ||W||^2`` of one layer."""
    w = weight.detach().float()
    return float(((w - dequantized) ** 2).sum() / (w**2).sum().clamp_min(1e-30))


class RTNMethod:
    """Round-to-nearest on every linear; needs no calibration data."""

    name = "rtn"
    needs_calibration = False

    def quantize_block(self, ctx) -> dict:
        from qtool.pipeline import LayerResult

        out = {}
        for name in ctx.spec.linears:
            lin = ctx.linear(name)
            qw = rtn_quantize(lin.weight, ctx.config.bits_for(ctx.full_name(name)), ctx.config.group_size, ctx.config.symmetric, lin.bias,
                              ratios=config_ratios(ctx.config))
            deq = qw.dequantize()
            # weight_rel_err: the squared ratio, kept for older readers of qtool.json
            out[name] = LayerResult(qw, {"weight_rel_err": weight_error(lin.weight, deq),
                                         **layer_errors(lin.weight, deq)})
        return out
