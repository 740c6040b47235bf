"""Helpers shared by the pack tests: deterministic QuantizedWeight builders, a scalar field
reader that follows the spec's words literally, and the refvectors location."""

from __future__ import annotations

from pathlib import Path

import torch

from qtool.qtensor import QuantizedWeight

REFVECTORS = Path(__file__).resolve().parents[1] / ".." / "shared" / "refvectors"


def field(word: int, p: int, bits: int = 4) -> int:
    """Field ``p`` of an int32 word read as uint32 (spec §1), from a Python int."""
    return ((int(word) & 0xFFFFFFFF) >> (bits * p)) & ((1 << bits) - 1)


def probe_codes(n: int, k: int, bits: int) -> torch.Tensor:
    """uint8 ``[n, k]``: a code that depends on both coordinates, so a misplaced element
    shows up (not a random draw: the value at (row, col) is known in closed form)."""
    r = torch.arange(n).view(n, 1)
    c = torch.arange(k).view(1, k)
    return ((r * 7 + c * 3 + (r * c) % 5 + (c // 16) * 11) % 2**bits).to(torch.uint8)


def make_qw(
    n: int,
    k: int,
    *,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = False,
    bias: bool = False,
    seed: int = 0,
    probe: bool = True,
) -> QuantizedWeight:
    """A QuantizedWeight with position-probe (or random) codes, random fp16 scales, random
    zeros in ``0 .. 2**bits - 1`` (always including 0 and the max), and with act-order a
    ``g_idx`` from a random processing order (``g_idx[perm] = arange(k) // g``)."""
    gen = torch.Generator().manual_seed(seed)
    G = 1 if group_size == -1 else k // group_size
    maxq = 2**bits - 1
    if probe:
        codes = probe_codes(n, k, bits)
    else:
        codes = torch.randint(0, maxq + 1, (n, k), generator=gen).to(torch.uint8)
    scales = (0.002 + 0.018 * torch.rand(n, G, generator=gen)).to(torch.float16)
    zeros = None
    if not sym:
        zeros = torch.randint(0, maxq + 1, (n, G), generator=gen).to(torch.uint8)
        zeros.view(-1)[0], zeros.view(-1)[-1] = 0, maxq
    g_idx = None
    if act_order and group_size != -1:
        order = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[order] = (torch.arange(k) // group_size).to(torch.int32)
    return QuantizedWeight(
        codes=codes,
        scales=scales,
        zeros=zeros,
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
        sym=sym,
        bias=torch.randn(n, generator=gen).to(torch.float16) if bias else None,
    )


def unpack_like(fmt, tensors: dict, qw: QuantizedWeight, **options) -> QuantizedWeight:
    """``fmt.unpack`` with the metadata of ``qw``."""
    n, k = qw.shape
    return fmt.unpack(
        tensors,
        bits=qw.bits,
        group_size=qw.group_size,
        sym=qw.sym,
        out_features=n,
        in_features=k,
        **options,
    )


def tensors_identical(a: dict, b: dict) -> bool:
    """Same keys, and every tensor has the same dtype, shape and bytes."""
    return a.keys() == b.keys() and all(
        a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]) for key in a
    )
