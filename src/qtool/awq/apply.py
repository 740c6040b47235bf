"""Fold AWQ scales into a block: the producer's output channel ``c`` is divided by
``s[c]`` and every consumer's input column ``c`` multiplied by ``s[c]``. The float block
computes the same function afterwards (up to float rounding), while the consumers'
weights now carry the salient channels at a larger, better-quantized magnitude."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qtool.errors import UnsupportedError


def fold_scales(prev: nn.Module, consumers: Sequence[nn.Linear], scales: torch.Tensor, name: str = "") -> None:
    """Apply ``scales`` in place.

    Args:
        prev: the producer: an ``nn.Linear`` (rows of weight and bias divided) or a norm
            with a per-channel ``weight`` (and optional ``bias``) that multiplies its
            normalised output (RMSNorm, LayerNorm).
        consumers: linears reading ``prev``'s output; weight columns multiplied.
        scales: float ``[k]``, ``k`` = ``prev``'s output channels = consumers' in_features.
        name: the group, for error messages.

    Raises:
        UnsupportedError: ``prev`` has no per-channel weight of length ``k``.
    """
    k = scales.numel()
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            if prev.out_features != k:
                raise UnsupportedError(f"AWQ cannot fold scales into {name}: {prev.out_features} outputs, {k} scales")
            _divide(prev.weight, scales[:, None])
        else:
            weight = getattr(prev, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.shape != (k,):
                raise UnsupportedError(
                    f"AWQ cannot fold scales into {name} ({type(prev).__name__}): it needs a per-channel weight of "
                    f"length {k}; use --method gptq or rtn for this architecture")
            _divide(weight, scales)
        bias = getattr(prev, "bias", None)
        if isinstance(bias, torch.Tensor):
            _divide(bias, scales)
        for lin in consumers:
            if lin.in_features != k:
                raise UnsupportedError(f"AWQ cannot fold scales of {name}: a consumer has {lin.in_features} inputs, not {k}")
            w = lin.weight
            w.copy_((w.float() * scales.to(w.device, torch.float32)[None, :]).to(w.dtype))


def _divide(param: torch.Tensor, scales: torch.Tensor) -> None:
    param.copy_((param.float() / scales.to(param.device, torch.float32)).to(param.dtype))
