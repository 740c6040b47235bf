"""Fake quantization (quantize then dequantize) with exactly the arithmetic of
``qtool.rtn.rtn_quantize``, vectorised over any leading dimensions so the AWQ searches
can score many candidates at once. ``fake_quantize(w, ...)`` equals
``rtn_quantize(w, ...).dequantize()`` bit for bit."""

from __future__ import annotations

import torch

from qtool.rtn import dequantize_codes, fit_storage_scale, group_qparams, quantize_to_codes


def fake_quantize_groups(groups: torch.Tensor, bits: int, sym: bool, bound: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize every row of the last dimension as one group.

    Args:
        groups: float ``[..., g]``; each ``[g]`` vector is one quantization group.
        bits: code width.
        sym: symmetric or asymmetric.
        bound: optional float ``[..., 1]`` (broadcastable): weights are clamped to
            ``[-bound, bound]`` first (AWQ clipping).

    Returns:
        float32, the shape of ``groups``.
    """
    w = groups.float()
    if bound is not None:
        bound = bound.float()
        w = torch.maximum(torch.minimum(w, bound), -bound)
    shape = w.shape
    flat = w.reshape(-1, shape[-1])  # [rows, g]
    scale, zero = group_qparams(flat, bits, sym)
    codes = quantize_to_codes(flat, scale[:, None], zero[:, None], bits)
    scale = fit_storage_scale(flat, codes, zero[:, None], scale)
    return dequantize_codes(codes, scale[:, None], zero[:, None]).reshape(shape)


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool,
                  clip_max: torch.Tensor | None = None) -> torch.Tensor:
    """``rtn_quantize(weight, bits, group_size, sym, clip_max=clip_max).dequantize()``.

    Args:
        weight: float ``[n, k]``.
        group_size: divides ``k``, or -1 for one group per row.
        clip_max: optional float ``[n, G]`` absolute bound per group.

    Returns:
        float32 ``[n, k]``.
    """
    n, k = weight.shape
    g = k if group_size == -1 else group_size
    assert k % g == 0, (k, g)
    grouped = weight.reshape(n, k // g, g)  # [n, G, g]
    bound = None if clip_max is None else clip_max.unsqueeze(-1)  # [n, G, 1]
    return fake_quantize_groups(grouped, bits, sym, bound).reshape(n, k)
