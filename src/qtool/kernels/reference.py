"""Torch reference for the dequant-matmul kernels: ``Y = X @ dequant(W) (+ bias)``.

Every layout is unpacked exactly as specified in ``shared/refvectors/README.md`` (GPTQ §3,
Marlin §2), dequantized in float32 (``(code - zero) * scale`` is exact there), multiplied
in float32 and cast once to ``x.dtype``. The Triton kernels are tested against these
functions; they are also the CPU fallback of :func:`qtool.kernels.quant_matmul`.

The Marlin decoding here is deliberately written differently from the kernel's (a tensor
reshape/permute of the whole chunk instead of per-element index arithmetic), so that the
two are independent checks of the spec's closed form.
"""

from __future__ import annotations

import torch

# Marlin §2.5 / AWQ §4.2: nibble p of a zero-point word holds column ORDER[p] of its 8.
_ZP_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_along_k(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[k/per, n]`` row-packed words -> int32 codes ``[k, n]`` (``per = 32/bits``;
    field ``i`` of ``qweight[r, j]`` is row ``per*r + i``)."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=qweight.device) * bits
    fields = (qweight.unsqueeze(1) >> shifts.view(1, per, 1)) & (2**bits - 1)  # [k/per, per, n]
    return fields.reshape(-1, qweight.shape[1])


def unpack_along_n(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[rows, n/per]`` column-packed words -> int32 ``[rows, n]`` (field ``i`` of
    ``packed[r, c]`` is column ``per*c + i``)."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    fields = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)  # [rows, n/per, per]
    return fields.reshape(packed.shape[0], -1)


def contiguous_groups(k: int, group_size: int, device=None) -> torch.Tensor:
    """int64 ``[k]``: group id ``c // group_size`` (all 0 when ``group_size == -1``)."""
    idx = torch.arange(k, device=device)
    return torch.zeros_like(idx) if group_size == -1 else idx // group_size


def _finish(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [..., k] @ w [k, n] (+ bias)`` in float32, cast to ``x.dtype``."""
    y = x.float() @ w
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ----------------------------------------------------------------------------- GPTQ


def gptq_dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor | None,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    *,
    bits: int = 4,
    version: int = 1,
    group_size: int | None = None,
) -> torch.Tensor:
    """GPTQ tensors -> float32 weight ``[k, n]`` (spec §3.3).

    ``qweight`` int32 ``[k/per, n]``; ``qzeros`` int32 ``[G, n/per]`` (stored zero ``z - 1``
    for ``version=1``, ``z`` for ``version=2``) or ``None`` for the implicit symmetric
    midpoint ``2**(bits-1)``; ``scales`` float ``[G, n]``; ``g_idx`` int ``[k]`` group of
    every input channel, or ``None`` with ``group_size`` (contiguous groups).
    """
    codes = unpack_along_k(qweight, bits)  # [k, n]
    k = codes.shape[0]
    if g_idx is None:
        if group_size is None:
            raise ValueError("gptq_dequantize: pass g_idx or group_size")
        g_idx = contiguous_groups(k, group_size, qweight.device)
    gi = g_idx.long()
    if qzeros is None:
        zeros = torch.full(scales.shape, 2 ** (bits - 1), dtype=torch.int32, device=scales.device)
    else:
        zeros = unpack_along_n(qzeros, bits) + (1 if version == 1 else 0)  # [G, n]
    return (codes - zeros[gi]).float() * scales.float()[gi]


def gptq_matmul_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor | None,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    *,
    bits: int = 4,
    version: int = 1,
    bias: torch.Tensor | None = None,
    group_size: int | None = None,
    perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [..., k] @ gptq_dequantize(...) (+ bias)`` -> ``[..., n]`` in ``x.dtype``.

    ``perm`` (int ``[k]``, optional): row ``r`` of ``qweight`` (and ``g_idx[r]``) belongs to
    input channel ``perm[r]``, so the activations are gathered as ``x[..., perm]``."""
    w = gptq_dequantize(
        qweight, qzeros, scales, g_idx, bits=bits, version=version, group_size=group_size
    )
    if perm is not None:
        x = x[..., perm.long()]
    return _finish(x, w, bias)


# --------------------------------------------------------------------------- Marlin


def marlin_unpack_codes(B: torch.Tensor, *, k: int, n: int) -> torch.Tensor:
    """Marlin ``B`` int32 ``[k/16, 2n]`` -> int32 codes ``[k, n]`` (spec §2.2).

    Word ``u = 16*col + 4*t + j`` of a 128-word chunk (thread ``i = 4*col + t``, tile ``j``)
    holds, in nibble ``p = p0 + 2*p1 + 4*p2``, the element at row-in-tile
    ``a = 8*p0 + 2*t + p2`` and column ``16*j + 8*p1 + col`` of the 64-column chunk.
    """
    nib = unpack_along_n(B, 4)  # [k/16, 16n]: nibble p of word u at 8u + p
    # [r, c, col, t, j, p2, p1, p0]
    nib = nib.reshape(k // 16, n // 64, 8, 4, 4, 2, 2, 2)
    # rows: (r, p0, t, p2) -> 16r + 8p0 + 2t + p2; cols: (c, j, p1, col) -> 64c + 16j + 8p1 + col
    return nib.permute(0, 7, 3, 5, 1, 4, 6, 2).reshape(k, n)


def marlin_scale_perm(grouped: bool) -> list[int]:
    """The 64-entry (grouped) or 32-entry (single) table with ``s[.., x] = S[.., perm[x]]``
    inside every block (spec §2.3)."""
    if grouped:
        return [i + 8 * j for i in range(8) for j in range(8)]
    return [2 * i + off for i in range(4) for off in (0, 1, 8, 9, 16, 17, 24, 25)]


def marlin_unpermute_scales(s: torch.Tensor, *, grouped: bool) -> torch.Tensor:
    """Stored Marlin scales ``[G, n]`` -> logical scales ``S[G, n]`` (column = output)."""
    perm = torch.tensor(marlin_scale_perm(grouped), device=s.device)
    block = perm.numel()
    blocks = s.reshape(s.shape[0], -1, block)  # [G, n/block, block]
    out = torch.empty_like(blocks)
    out[:, :, perm] = blocks
    return out.reshape(s.shape)


def marlin_unpack_zeros(zp: torch.Tensor, *, n: int) -> torch.Tensor:
    """AWQ-Marlin ``zp`` int32 ``[G, n/8]`` -> logical zeros int32 ``[G, n]`` (spec §2.5:
    grouped 64-column transpose, then the in-word ORDER interleave, packed along n)."""
    z2 = unpack_along_n(zp, 4).reshape(zp.shape[0], n // 8, 8)  # [G, n/8, 8]
    z1 = torch.empty_like(z2)
    z1[:, :, list(_ZP_ORDER)] = z2  # z2[.., 8w + p] = z1[.., 8w + ORDER[p]]
    return marlin_unpermute_scales(z1.reshape(zp.shape[0], n), grouped=True)


def marlin_dequantize(
    B: torch.Tensor,
    s: torch.Tensor,
    *,
    k: int,
    n: int,
    group_size: int,
    zp: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Marlin tensors -> float32 weight ``[k, n]`` with rows in ``B``'s order (sorted by
    group when the layer has act-order; the original order is ``perm``).

    Scales use the *single* permutation when there is one group (``group_size == -1`` or
    ``group_size >= k``), else the grouped one; ``zp`` always uses the grouped one.
    ``g_idx`` (sorted, int ``[k]``) overrides the contiguous ``row // group_size`` groups.
    """
    codes = marlin_unpack_codes(B, k=k, n=n)
    grouped = group_size != -1 and group_size < k
    scales = marlin_unpermute_scales(s, grouped=grouped).float()  # [G, n]
    if g_idx is None:
        gi = contiguous_groups(k, -1 if not grouped else group_size, B.device)
    else:
        gi = g_idx.long()
    zeros = 8 if zp is None else marlin_unpack_zeros(zp, n=n)[gi]
    return (codes - zeros).float() * scales[gi]


def marlin_matmul_ref(
    x: torch.Tensor,
    B: torch.Tensor,
    s: torch.Tensor,
    *,
    k: int,
    n: int,
    group_size: int,
    zp: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [..., k]`` times the Marlin weight -> ``[..., n]`` in ``x.dtype``.

    With act-order, ``B`` holds the rows ``perm[0], perm[1], ...`` of the original weight,
    so the activation columns are gathered the same way (``x[..., perm]``) as vLLM does.
    """
    w = marlin_dequantize(B, s, k=k, n=n, group_size=group_size, zp=zp, g_idx=g_idx)
    if perm is not None:
        x = x[..., perm.long()]
    return _finish(x, w, bias)
