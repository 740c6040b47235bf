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
"""

from __future__ import annotations

import torch

from qtool.layer_error import layer_errors
from qtool.qtensor import QuantizedWeight


def group_qparams(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero for each row of ``w``.

    Args:
        w: float ``[n, m]``, the weights of one group (or clip-bounded ``[n, 2]``
            ``(min, max)`` pairs: only the row min and max matter).
        bits: code width.
        sym: symmetric (zero = midpoint) or asymmetric.

    Returns:
        ``(scale, zero)``: scale float32 ``[n]`` (exact; stored as float16 by
        ``storage_scale``), zero float32 ``[n]`` holding integers in ``0 .. 2**bits - 1``.
    """
    w = w.float()
    maxq = 2**bits - 1
    # the range always includes 0 so that exact zeros stay exact (as GPTQ and llm-compressor)
    wmin = torch.clamp(w.amin(dim=1), max=0.0)
    wmax = torch.clamp(w.amax(dim=1), min=0.0)
    return minmax_qparams(wmin, wmax, bits, sym, maxq)


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
    scale, zero = group_qparams(flat, bits, sym)
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
            qw = rtn_quantize(lin.weight, ctx.config.bits, ctx.config.group_size, ctx.config.symmetric, lin.bias)
            deq = qw.dequantize()
            # weight_rel_err: the squared ratio, kept for older readers of qtool.json
            out[name] = LayerResult(qw, {"weight_rel_err": weight_error(lin.weight, deq),
                                         **layer_errors(lin.weight, deq)})
        return out
