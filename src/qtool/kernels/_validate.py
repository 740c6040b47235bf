"""Argument checks shared by the torch reference path and the Triton wrappers.

Pure Python on tensor metadata (shapes, dtypes, devices): no tensor values are read, so a
check never synchronizes the GPU. A malformed call raises ``ValueError`` naming the
argument, the constraint and the value; a well-formed request the kernels do not implement
raises :class:`qtool.errors.UnsupportedError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from qtool.errors import UnsupportedError

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
GPTQ_BITS = (2, 4, 8)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class GemmDims:
    """Problem size after validation: ``x [m, k] @ w [k, n]``, ``groups`` scale rows.

    ``group_size`` is ``-1`` for one group; ``None`` when a ``g_idx`` assigns the groups.
    """

    m: int
    k: int
    n: int
    groups: int
    group_size: int | None


def _expect(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{where}: {msg}")


def _check_common(where: str, x: torch.Tensor, k: int, bias: torch.Tensor | None, n: int) -> int:
    _expect(x.dtype in ACT_DTYPES, where, f"x must be float16, bfloat16 or float32, got {x.dtype}")
    _expect(
        x.dim() >= 1 and x.shape[-1] == k,
        where,
        f"x must have shape [..., {k}] (in_features of the packed weight), got {tuple(x.shape)}",
    )
    if bias is not None:
        _expect(bias.shape == (n,), where, f"bias must have shape [{n}], got {tuple(bias.shape)}")
        _expect(bias.is_floating_point(), where, f"bias must be floating point, got {bias.dtype}")
        _expect(bias.device == x.device, where, f"bias is on {bias.device}, x on {x.device}")
    return x.numel() // k if k else 0


def _check_tensor(where: str, name: str, t: torch.Tensor, shape: tuple, dtypes, device) -> None:
    _expect(
        t.dtype in dtypes,
        where,
        f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}",
    )
    _expect(
        tuple(t.shape) == shape, where, f"{name} must have shape {list(shape)}, got {list(t.shape)}"
    )
    _expect(t.device == device, where, f"{name} is on {t.device}, x on {device}")


def num_groups(k: int, group_size: int) -> int:
    """Scale rows for ``k`` input channels: 1 when ``group_size == -1``, else ``ceil(k/g)``."""
    return 1 if group_size == -1 else -(-k // group_size)


def validate_gptq(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor | None,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    *,
    bits: int,
    version: int,
    group_size: int | None,
    bias: torch.Tensor | None,
    perm: torch.Tensor | None = None,
) -> GemmDims:
    """Check a GPTQ call (layout: README §3, plus the optional row order ``perm``) and
    return its dimensions."""
    where = "gptq_matmul"
    if bits not in GPTQ_BITS:
        raise UnsupportedError(
            f"{where}: bits={bits} is not supported; use 2, 4 or 8 (3-bit words spill across int32)"
        )
    _expect(
        version in (1, 2),
        where,
        f"version must be 1 (stored zero - 1) or 2 (stored zero), got {version}",
    )
    per = 32 // bits
    _expect(
        qweight.dtype == torch.int32 and qweight.dim() == 2,
        where,
        f"qweight must be int32 [k/{per}, n], got {qweight.dtype} {list(qweight.shape)}",
    )
    k, n = qweight.shape[0] * per, qweight.shape[1]
    _expect(
        n % per == 0,
        where,
        f"out_features n={n} must be a multiple of {per} (qzeros packs {per} per word)",
    )
    m = _check_common(where, x, k, bias, n)
    _expect(scales.dim() == 2, where, f"scales must be [G, {n}], got {list(scales.shape)}")
    groups = scales.shape[0]
    _check_tensor(where, "scales", scales, (groups, n), SCALE_DTYPES, x.device)
    _check_tensor(where, "qweight", qweight, (k // per, n), (torch.int32,), x.device)
    if qzeros is not None:
        _check_tensor(where, "qzeros", qzeros, (groups, n // per), (torch.int32,), x.device)
    if perm is not None:
        _check_tensor(where, "perm", perm, (k,), INDEX_DTYPES, x.device)
    if g_idx is not None:
        _check_tensor(where, "g_idx", g_idx, (k,), INDEX_DTYPES, x.device)
        group_size = None
    else:
        if group_size is None:
            _expect(
                groups == 1,
                where,
                f"scales has {groups} groups: pass g_idx or group_size to say which rows use which group",
            )
            group_size = -1
        _expect(
            group_size == -1 or group_size > 0,
            where,
            f"group_size must be -1 or positive, got {group_size}",
        )
        _expect(
            groups == num_groups(k, group_size),
            where,
            f"scales has {groups} rows but k={k}, group_size={group_size} needs {num_groups(k, group_size)}",
        )
    return GemmDims(m=m, k=k, n=n, groups=groups, group_size=group_size)


def marlin_grouped(k: int, group_size: int) -> bool:
    """Marlin scales use the grouped permutation iff there is more than one group
    (README §2.3: ``g == -1`` and ``g == k`` both use the single one)."""
    return group_size != -1 and group_size < k


def validate_marlin(
    x: torch.Tensor,
    B: torch.Tensor,
    s: torch.Tensor,
    *,
    k: int,
    n: int,
    group_size: int,
    zp: torch.Tensor | None,
    perm: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> GemmDims:
    """Check a Marlin call (layout: README §2, 4-bit only) and return its dimensions."""
    where = "marlin_matmul"
    _expect(k > 0 and k % 16 == 0, where, f"k={k} must be a positive multiple of 16 (16x16 tiles)")
    _expect(
        n > 0 and n % 64 == 0, where, f"n={n} must be a positive multiple of 64 (1024-entry chunks)"
    )
    _check_tensor(where, "B", B, (k // 16, 2 * n), (torch.int32,), x.device)
    m = _check_common(where, x, k, bias, n)
    _expect(
        group_size == -1 or group_size > 0,
        where,
        f"group_size must be -1 or positive, got {group_size}",
    )
    groups = num_groups(k, group_size) if marlin_grouped(k, group_size) else 1
    _check_tensor(where, "s", s, (groups, n), SCALE_DTYPES, x.device)
    if zp is not None:
        _check_tensor(where, "zp", zp, (groups, n // 8), (torch.int32,), x.device)
    for name, t in (("perm", perm), ("g_idx", g_idx)):
        if t is not None:
            _check_tensor(where, name, t, (k,), INDEX_DTYPES, x.device)
    return GemmDims(m=m, k=k, n=n, groups=groups, group_size=group_size)
