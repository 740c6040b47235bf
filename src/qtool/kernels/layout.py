"""Kernel layout of a packed layer: its checkpoint tensors rearranged once, at load time,
so that the dequant-matmul kernels take their tile-uniform scale path.

Act-order (``desc_act``) GPTQ checkpoints keep the rows of ``qweight`` in input-channel
order with a non-monotone ``g_idx``: the rows of one K tile belong to many groups, and a
kernel reading them as stored must gather a scale and a zero per element. As Marlin,
exllama and vLLM do when they load such a checkpoint, :func:`kernel_layout` sorts the rows
by group instead: ``perm = stable argsort(g_idx)``, row ``r`` of the repacked ``qweight``
is input channel ``perm[r]``, and the kernel reads the activations as ``x[..., perm]``.
GPTQ's act-order gives every group exactly ``group_size`` channels (``g_idx[c]`` is the
position of ``c`` in the processing order, floor-divided by ``group_size``), so after the
sort the groups are the contiguous ``r // group_size`` and no ``g_idx`` is passed.
Marlin checkpoints are already stored sorted, with ``perm``; their sorted ``g_idx`` is
dropped the same way.

Fallback: a ``g_idx`` whose sorted form is not ``r // group_size`` (groups of unequal
sizes: never written by GPTQ or qtool, possible in a hand-made checkpoint) is kept, and the
kernel then gathers the group of every row (the per-row path). The result is exact either
way; only the speed differs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from qtool.kernels._validate import marlin_grouped, num_groups
from qtool.kernels.reference import contiguous_groups, unpack_along_k


def pack_along_k(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int ``[k, n]`` codes -> int32 ``[k/per, n]`` words, field ``i`` of word row ``r`` =
    row ``per*r + i`` (the inverse of :func:`qtool.kernels.reference.unpack_along_k`)."""
    per = 32 // bits
    fields = codes.to(torch.int32).reshape(-1, per, codes.shape[1])  # [k/per, per, n]
    words = torch.zeros_like(fields[:, 0])  # [k/per, n]
    for i in range(per):  # int32 throughout: a field shifted into bit 31 wraps to negative
        words |= fields[:, i] << (bits * i)
    return words


def sorted_group_size(g_idx: torch.Tensor, groups: int, group_size: int | None) -> int | None:
    """The group size ``g`` for which ``sort(g_idx)`` is the contiguous ``r // g`` over
    ``groups`` groups (``-1`` for one group), or ``None`` when there is none. ``group_size``
    is the layer's own when known; ``None`` infers it from the size of group 0."""
    k = g_idx.numel()
    if group_size is None:
        group_size = -1 if groups == 1 else int((g_idx == 0).sum())
    if group_size == 0 or num_groups(k, group_size) != groups:
        return None
    expected = contiguous_groups(k, group_size, g_idx.device)
    return group_size if torch.equal(torch.sort(g_idx.long()).values, expected) else None


def _gptq(tensors: dict, meta: dict) -> tuple[dict, dict]:
    g_idx = tensors.get("g_idx")
    if g_idx is None:
        return tensors, meta
    k = g_idx.numel()
    group_size = sorted_group_size(g_idx, tensors["scales"].shape[0], meta.get("group_size"))
    if group_size is None:  # the documented fallback: per-row group gather
        return tensors, meta
    trivial = torch.equal(g_idx.long(), contiguous_groups(k, group_size, g_idx.device))
    if not trivial and "perm" in tensors:  # rows already reordered, but not sorted by group
        return tensors, meta
    tensors = {name: t for name, t in tensors.items() if name != "g_idx"}
    if not trivial:
        bits = meta.get("bits", 4)
        perm = torch.argsort(g_idx, stable=True)  # [k]
        codes = unpack_along_k(tensors["qweight"], bits)[perm]  # [k, n], rows sorted by group
        tensors.update(qweight=pack_along_k(codes, bits), perm=perm.to(torch.int32))
    return tensors, {**meta, "group_size": group_size}


def _marlin(tensors: dict, meta: dict) -> tuple[dict, dict]:
    g_idx = tensors.get("g_idx")
    if g_idx is None:
        return tensors, meta
    k = tensors["B"].shape[0] * 16
    group_size = meta["group_size"] if marlin_grouped(k, meta["group_size"]) else -1
    if torch.equal(g_idx.long(), contiguous_groups(k, group_size, g_idx.device)):
        tensors = {name: t for name, t in tensors.items() if name != "g_idx"}
    return tensors, meta


def kernel_layout(
    fmt: str, tensors: Mapping[str, torch.Tensor | None], meta: Mapping
) -> tuple[dict[str, torch.Tensor], dict]:
    """A layer's tensors in the layout the kernels read fastest (module docstring).

    Args:
        fmt: ``"gptq"`` or ``"marlin"``.
        tensors: the layer's tensors as :func:`qtool.kernels.quant_matmul` takes them
            (``None`` values are dropped); shapes are assumed valid for the format.
        meta: the layer's options (``bits`` / ``version`` / ``group_size``).

    Returns:
        ``(tensors, meta)`` for :func:`qtool.kernels.quant_matmul`, computing the same
        ``x @ W``: every tensor contiguous; a ``g_idx`` equal to ``c // group_size`` dropped;
        an act-order GPTQ ``qweight`` with its rows sorted by group plus ``perm`` (int32
        ``[k]``) in place of ``g_idx``; GPTQ ``meta`` gains the ``group_size`` that the
        dropped ``g_idx`` implied. Reads tensor values (one host sync per layer): call it
        once when a layer is loaded, not per forward.
    """
    t = {name: v.contiguous() for name, v in tensors.items() if v is not None}
    if fmt == "gptq":
        return _gptq(t, dict(meta))
    return _marlin(t, dict(meta))


__all__ = ["kernel_layout", "pack_along_k", "sorted_group_size"]
