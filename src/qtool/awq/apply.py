"""Fold AWQ scales into a block: the producer's output channel ``c`` is divided by
``s[c]`` and every consumer's input column ``c`` multiplied by ``s[c]``. The float block
computes the same function afterwards (up to float rounding), while the consumers'
weights now carry the salient channels at a larger, better-quantized magnitude.

How the producer absorbs ``1 / s`` depends on what it computes, which the family file
declares (``qtool.models.base.Producer``); ``qtool.awq.prove`` checks every fold on the
real model before calibration."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qtool.errors import UnsupportedError
from qtool.models.base import Producer


def fold_scales(prev: nn.Module, consumers: Sequence[nn.Linear], scales: torch.Tensor, name: str = "", *,
                kind: Producer, rows: tuple[int, int] | None = None) -> None:
    """Apply ``scales`` in place.

    Args:
        prev: the producer: an ``nn.Linear`` (``kind=LINEAR``: rows of weight and bias
            divided) or a norm with a per-channel ``weight`` (and optional ``bias``):
            ``RMSNORM``/``LAYERNORM`` (``norm(x) * w (+ b)``: ``w / s``) or
            ``RMSNORM_ONE_PLUS`` (``norm(x) * (1 + w)``: ``w' = (1 + w) / s - 1``).
        consumers: linears reading ``prev``'s output; weight columns multiplied.
        scales: float ``[k]``, ``k`` = ``prev``'s output channels = consumers' in_features.
        name: the group, for error messages.
        kind: what ``prev`` computes (from the family file's ``ScaleGroup.kind``).
        rows: for a fused linear producer, the ``[start, stop)`` output rows that feed
            the consumers (``ScaleGroup.rows``; ``stop - start = k``); only they absorb
            ``1 / s``. None: all ``k`` outputs.

    Raises:
        UnsupportedError: ``prev`` is not what ``kind`` says, or a shape does not match ``k``.
    """
    k = scales.numel()
    s = scales.float()
    with torch.no_grad():
        start, stop = (0, k) if rows is None else rows
        if kind is Producer.LINEAR:
            outputs = prev.out_features if rows is None else stop - start
            if not isinstance(prev, nn.Linear) or outputs != k or not 0 <= start < stop <= prev.out_features:
                raise UnsupportedError(f"AWQ cannot fold scales into {name} ({type(prev).__name__}): it needs a linear "
                                       f"with {k} outputs; use --method gptq or rtn for this architecture")
            w = prev.weight[start:stop]
            _set(w, w.float() / s.to(w.device)[:, None])
        else:
            weight = getattr(prev, "weight", None)
            if isinstance(prev, nn.Linear) or not isinstance(weight, torch.Tensor) or weight.shape != (k,) or rows:
                raise UnsupportedError(
                    f"AWQ cannot fold scales into {name} ({type(prev).__name__}): it needs a norm with a per-channel "
                    f"weight of length {k}; use --method gptq or rtn for this architecture")
            sw = s.to(weight.device)
            if kind is Producer.RMSNORM_ONE_PLUS:
                _set(weight, (1.0 + weight.float()) / sw - 1.0)
            else:
                _set(weight, weight.float() / sw)
        bias = getattr(prev, "bias", None)
        if isinstance(bias, torch.Tensor):
            b = bias[start:stop]
            _set(b, b.float() / s.to(bias.device))
        for lin in consumers:
            if lin.in_features != k:
                raise UnsupportedError(f"AWQ cannot fold scales of {name}: a consumer has {lin.in_features} inputs, not {k}")
            _set(lin.weight, lin.weight.float() * s.to(lin.weight.device)[None, :])


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


def clamp_to_clip(linear: nn.Linear, clip_max: torch.Tensor, group_size: int) -> None:
    """Clamp ``linear``'s weight in place to AWQ's clip bounds (llm-awq's ``apply_clip``),
    for a solver that quantizes the clipped weight itself (``qtool.awq_gptq``).

    Args:
        linear: weight ``[n, k]``.
        clip_max: float ``[n, G]`` absolute bound per row and contiguous group
            (``search_clip``); ``G = k / group_size`` (1 for ``group_size == -1``).
    """
    w = linear.weight
    n, k = w.shape
    g = k if group_size == -1 else group_size
    with torch.no_grad():
        bound = clip_max.to(w.device, torch.float32).unsqueeze(-1)  # [n, G, 1]
        grouped = w.float().reshape(n, k // g, g)  # [n, G, g]
        _set(w, torch.maximum(torch.minimum(grouped, bound), -bound).reshape(n, k))
