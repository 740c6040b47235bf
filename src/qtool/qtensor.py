"""The canonical in-memory form of a quantized linear layer: the seam between methods
(rtn, gptq, awq) and formats (pack/*). Methods produce it, packers consume it, readers
reconstruct it. Nothing here knows about a method or a file format.

Orientation follows ``nn.Linear.weight``: ``n`` = out_features (rows), ``k`` = in_features.

Zero-point convention (one for all of qtool): every weight is
``w[j, c] = (codes[j, c] - zero[j, gi(c)]) * scales[j, gi(c)]`` with
``gi(c) = g_idx[c]`` if ``g_idx`` is set, else ``c // group_size`` (``group_size == -1``:
one group). For symmetric quantization ``zeros`` is ``None`` and the zero is the
implicit midpoint ``2 ** (bits - 1)`` (8 for 4-bit, the ``uint4b8`` type).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes plus scales (plus zeros) for one linear layer.

    Attributes:
        codes: uint8 ``[n, k]``, each in ``0 .. 2**bits - 1``; input channels in the
            original order (also with act-order).
        scales: float16 ``[n, G]``; row ``j``, column = group id.
        zeros: uint8 ``[n, G]`` logical zero points in ``0 .. 2**bits - 1``, or ``None``
            when ``sym`` (implicit zero ``2**(bits-1)``).
        g_idx: int32 ``[k]`` group id of every input channel, or ``None`` for the
            contiguous ``c // group_size`` assignment.
        bits: 4 or 8.
        group_size: input channels per group, or -1 for one group per row.
        sym: symmetric (no stored zeros) or asymmetric.
        bias: optional float ``[n]`` carried unchanged from the float layer.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    g_idx: torch.Tensor | None
    bits: int
    group_size: int
    sym: bool
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, k = self.codes.shape
        assert self.codes.dtype == torch.uint8, self.codes.dtype
        assert self.scales.dtype == torch.float16, self.scales.dtype
        assert self.scales.shape == (n, self.num_groups), (self.scales.shape, n, self.num_groups)
        assert self.sym == (self.zeros is None)
        if self.zeros is not None:
            assert self.zeros.dtype == torch.uint8 and self.zeros.shape == self.scales.shape
        if self.g_idx is not None:
            assert self.g_idx.dtype == torch.int32 and self.g_idx.shape == (k,)

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, k)`` = (out_features, in_features)."""
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def num_groups(self) -> int:
        k = self.codes.shape[1]
        return 1 if self.group_size == -1 else -(-k // self.group_size)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def group_index(self) -> torch.Tensor:
        """int64 ``[k]``: the group id of every input channel."""
        k = self.codes.shape[1]
        if self.g_idx is not None:
            return self.g_idx.long()
        if self.group_size == -1:
            return torch.zeros(k, dtype=torch.long)
        return torch.arange(k) // self.group_size

    def zeros_or_midpoint(self) -> torch.Tensor:
        """uint8 ``[n, G]`` logical zeros (the implicit midpoint when symmetric)."""
        if self.zeros is not None:
            return self.zeros
        return torch.full_like(self.scales, 2 ** (self.bits - 1), dtype=torch.uint8)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float weight ``[n, k]``. The product ``(code - zero) * scale`` is exact in
        float32, so this equals any correct reader of any format, bit for bit."""
        n, k = self.codes.shape
        g = k if self.group_size == -1 else self.group_size
        if self.g_idx is None and k % g == 0:
            codes = self.codes.float().view(n, k // g, g)  # [n, G, g]
            z = self.zeros_or_midpoint().float().unsqueeze(-1)  # [n, G, 1]
            return ((codes - z) * self.scales.float().unsqueeze(-1)).view(n, k).to(dtype)
        gi = self.group_index()
        s = self.scales.float()[:, gi]  # [n, k]
        z = self.zeros_or_midpoint().float()[:, gi]  # [n, k]
        return ((self.codes.float() - z) * s).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that define this weight (for hashing and equality checks)."""
        out = {"codes": self.codes, "scales": self.scales}
        for name in ("zeros", "g_idx", "bias"):
            t = getattr(self, name)
            if t is not None:
                out[name] = t
        return out

    def equal(self, other: "QuantizedWeight") -> bool:
        """Exact equality of metadata and every tensor."""
        if (self.bits, self.group_size, self.sym) != (other.bits, other.group_size, other.sym):
            return False
        a, b = self.tensors(), other.tensors()
        if a.keys() != b.keys():
            return False
        return all(torch.equal(a[key], b[key]) for key in a)
