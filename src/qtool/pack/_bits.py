"""Integer primitives shared by the format modules: fixed-width fields in int32 words,
scale dtype checks and the contiguous group assignment. Nothing here knows a format.

A packed word is an ``int32`` on disk whose bits are read as ``uint32``. With
``per = 32 // bits`` fields per word, field ``p`` of a word holds bits
``bits*p .. bits*p + bits - 1`` (field 0 is the least significant).
"""

from __future__ import annotations

import torch

from qtool.errors import FormatError

_WORD = 2**32


def per_word(bits: int) -> int:
    """Fields of ``bits`` bits in one int32 word (8 for 4-bit, 4 for 8-bit)."""
    assert bits in (4, 8), bits
    return 32 // bits


def pack_words(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack consecutive entries of the last dim into int32 words.

    Args:
        values: integer ``[..., m]`` with entries in ``0 .. 2**bits - 1`` and
            ``m % (32 // bits) == 0``.
        bits: field width, 4 or 8.

    Returns:
        int32 ``[..., m // per]`` with ``word[..., w] = sum_p values[..., per*w + p] << bits*p``
        (the uint32 bit pattern, reinterpreted as two's-complement int32).
    """
    per = per_word(bits)
    *lead, m = values.shape
    assert m % per == 0, (m, per)
    v = values.to(torch.int64)
    assert int(v.min()) >= 0 and int(v.max()) < 2**bits, "field value out of range"
    v = v.reshape(*lead, m // per, per)  # [..., m/per, per]
    shifts = torch.arange(per, dtype=torch.int64) * bits  # [per]
    words = (v << shifts).sum(dim=-1)  # [..., m/per], in 0 .. 2**32 - 1
    words = torch.where(words >= 2**31, words - _WORD, words)
    return words.to(torch.int32)


def unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_words`: int32 ``[..., w]`` -> uint8 ``[..., w * per]``."""
    per = per_word(bits)
    assert words.dtype == torch.int32, words.dtype
    u = words.to(torch.int64) & (_WORD - 1)  # [..., w] as uint32
    shifts = torch.arange(per, dtype=torch.int64) * bits  # [per]
    fields = (u.unsqueeze(-1) >> shifts) & (2**bits - 1)  # [..., w, per]
    return fields.flatten(-2).to(torch.uint8)  # [..., w*per]


def contiguous_g_idx(k: int, group_size: int) -> torch.Tensor:
    """int32 ``[k]``: ``c // group_size`` (all zeros for ``group_size == -1``)."""
    if group_size == -1:
        return torch.zeros(k, dtype=torch.int32)
    return (torch.arange(k) // group_size).to(torch.int32)


def canonical_g_idx(g_idx: torch.Tensor | None, group_size: int) -> torch.Tensor | None:
    """``None`` when ``g_idx`` is absent or equals the contiguous assignment, else int32
    ``[k]``. Readers return this so that a layer without act-order has ``g_idx=None``."""
    if g_idx is None:
        return None
    g_idx = g_idx.to(torch.int32)
    if torch.equal(g_idx, contiguous_g_idx(g_idx.numel(), group_size)):
        return None
    return g_idx.contiguous()


def fp16_scales(t: torch.Tensor, where: str) -> torch.Tensor:
    """The stored scales as float16. bf16/fp32 scales (AutoGPTQ keeps the model dtype) are
    accepted only when every value is exactly representable in float16, so the
    dequantized weight stays bit-exact."""
    if t.dtype == torch.float16:
        return t
    h = t.to(torch.float16)
    if not torch.equal(h.to(t.dtype), t):
        raise FormatError(
            f"{where}: scales of dtype {t.dtype} are not exactly representable in float16; "
            "qtool keeps float16 scales (re-export the checkpoint with float16 scales)"
        )
    return h


def group_count(k: int, group_size: int) -> int:
    """Number of groups ``G`` along ``k`` (1 for ``group_size == -1``)."""
    return 1 if group_size == -1 else -(-k // group_size)


def not_multiple(dim: str, value: int, of: int, why: str) -> str | None:
    """``"{dim}={value} is not a multiple of {of} ({why})"`` when it is not, else ``None``.
    The fix is the caller's to name (``qtool.fixes``): it depends on the command."""
    return f"{dim}={value} is not a multiple of {of} ({why})" if value % of else None


def group_size_reason(k: int, group_size: int) -> str | None:
    """Reason why ``group_size`` cannot split ``k`` into whole groups, or ``None``."""
    if group_size == -1:
        return None
    if group_size <= 0:
        return f"group_size={group_size} is invalid (a positive group size or -1)"
    if k % group_size:
        return f"k={k} is not a multiple of group_size={group_size}"
    return None


def expect_shape(
    tensors: dict[str, torch.Tensor], name: str, shape: tuple, dtype: torch.dtype | str, where: str
) -> torch.Tensor:
    """The tensor ``name`` of a packed layer, checked against ``shape`` and ``dtype``
    (a ``torch.dtype``, or ``"float"`` / ``"int"`` for any floating / integer dtype)."""
    if name not in tensors:
        raise FormatError(f"{where}: tensor '{name}' is missing (have {sorted(tensors)})")
    t = tensors[name]
    if tuple(t.shape) != tuple(shape):
        raise FormatError(f"{where}: '{name}' has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if dtype == "float":
        ok = t.is_floating_point()
    elif dtype == "int":
        ok = not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool
    else:
        ok = t.dtype == dtype
    if not ok:
        raise FormatError(f"{where}: '{name}' has dtype {t.dtype}, expected {dtype}")
    return t


def bias_tensors(bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``{"bias": float16 [n]}`` when a bias is set, else ``{}``."""
    return {} if bias is None else {"bias": bias.detach().to(torch.float16).contiguous()}


def read_bias(tensors: dict[str, torch.Tensor], n: int, where: str) -> torch.Tensor | None:
    """The optional ``bias`` (float ``[n]``), unchanged."""
    if "bias" not in tensors:
        return None
    return expect_shape(tensors, "bias", (n,), "float", where)
