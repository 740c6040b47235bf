"""Triton GEMM ``Y = X @ dequant(W) (+ bias)`` reading the Marlin tile layout as stored.

Layout (``shared/refvectors/README.md`` §2, 4-bit only):

====== ============ ============ ====================================================
tensor dtype        shape        content
====== ============ ============ ====================================================
B      int32        [k/16, 2n]   16x16 tiles, 1024-entry permutation, 8 codes per word
s      fp16/bf16/32 [G, n]       scales; columns permuted: grouped 8x8 transpose per 64
                                 columns when G > 1, the "single" 32-column perm when one
                                 group (``group_size == -1`` or ``== k``)
zp     int32        [G, n/8]     optional zero points (AWQ-Marlin ``uint4``); always the
                                 grouped perm, then the 0,2,4,6,1,3,5,7 in-word interleave
perm   int32/int64  [k]          optional act-order: row ``x`` of ``B`` is input channel
                                 ``perm[x]`` (activations are gathered with it)
g_idx  int32/int64  [k]          optional sorted group ids of ``B``'s rows (default
                                 ``row // group_size``)
====== ============ ============ ====================================================

Without ``zp`` the value is ``code - 8`` (``uint4b8``); with it ``code - zero``.

Decoding (spec §2.2). Within a 16x64 chunk, word ``u = 16*col + 4*t + j`` of row ``r`` holds
in nibble ``p0 + 2*p1 + 4*p2`` the element at ``k = 16r + 8p0 + 2t + p2``,
``n = 64c + 16j + 8p1 + col``: two of the nibble bits belong to k and one to n. A dot
product does not care in which order the tile's rows and columns are held, so the kernel
keeps the tile in *storage order*:

* it loads each word once, as a ``[BLOCK_K/4, BLOCK_N/2]`` tile indexed by ``(r, t)`` and
  ``(c, col, j)`` (runs of 4 contiguous words per thread, a full 512-byte chunk per warp),
* unpacks with a broadcast shift to ``[BLOCK_K/4, 4, BLOCK_N/2, 2]`` (``(p0, p2)`` on the
  k side, ``p1`` on the n side) and reshapes row-major to ``[BLOCK_K, BLOCK_N]``,
* and maps tile positions to logical indices with two index vectors: row ``kk`` is input
  channel ``k_of(kk)`` (activations are gathered with it, composed with ``perm`` for
  act-order), column ``nn`` is output channel ``n_of(nn)`` (scales, zeros, bias and the
  output store use it).

Because ``k_of`` permutes only within 16-row blocks, a ``BLOCK_K`` tile (a multiple of 16)
holds exactly the channels ``[kt*BLOCK_K, (kt+1)*BLOCK_K)``, so the group logic, split-K
and the two dequant paths (tile-uniform vs per-row groups) are those of
:mod:`qtool.kernels.gptq_triton`. Scales and zeros are read through the inverse of their
column permutations. An act-order layer's sorted ``g_idx`` is the contiguous
``row // group_size`` whenever every group holds ``group_size`` rows (always, for GPTQ
act-order); :mod:`qtool.kernels.layout` then drops it, so only ``perm`` reaches the kernel
and the tile-uniform path runs. Row offsets are computed in int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qtool.errors import UnsupportedError
from qtool.kernels import _launch
from qtool.kernels._device import dot, store_out
from qtool.kernels._validate import marlin_grouped, validate_marlin
from qtool.kernels.reference import marlin_matmul_ref


@triton.jit
def _scale_col(offs_n, GROUPED: tl.constexpr):
    """Stored column of logical scale column ``n`` (inverse of spec §2.3)."""
    if GROUPED:  # s[64c + 8i + j] = S[64c + i + 8j]
        return 64 * (offs_n // 64) + 8 * (offs_n % 8) + (offs_n % 64) // 8
    else:  # s[32c + 8i + m] = S[32c + 2i + off[m]], off = 0,1,8,9,16,17,24,25
        r = offs_n % 32
        return 32 * (offs_n // 32) + 8 * ((r // 2) % 4) + 2 * (r // 8) + r % 2


@triton.jit
def _marlin_kernel(
    x_ptr,
    b_ptr,
    zp_ptr,
    s_ptr,
    g_idx_ptr,
    perm_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    M_BUCKET,
    stride_xm,
    stride_xk,
    GROUP_SIZE: tl.constexpr,
    GROUPED_SCALES: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_G_IDX: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    tl.static_assert(BLOCK_K % 16 == 0, "BLOCK_K must be a multiple of the 16-row Marlin tile")
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_pid_m
    pid_n = pid // num_pid_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    dtype = x_ptr.dtype.element_ty

    # columns in storage order: nn = 2*w + p1 with word column w = 32c + 4col + j
    offs_nn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_of = 64 * (offs_nn // 64) + 16 * ((offs_nn // 2) % 4) + 8 * (offs_nn % 2) + (offs_nn // 8) % 8
    mask_n = offs_nn < N
    offs_w = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    word_n = 128 * (offs_w // 32) + 16 * ((offs_w // 4) % 8) + offs_w % 4  # [BN/2]
    mask_w = offs_w < N // 2
    # nibble shift for (pk = 2*p0 + p2, p1): 4 * (p0 + 2*p1 + 4*p2)
    pk = tl.arange(0, 4)[:, None]
    p1 = tl.arange(0, 2)[None, :]
    shift = 4 * (pk // 2 + 2 * p1 + 4 * (pk % 2))  # [4, 2]
    s_col = _scale_col(n_of, GROUPED_SCALES)
    # zero of column n: nibble INV[(n%64)//8] (INV = 0,4,1,5,2,6,3,7) of zp[g, 8*(n//64) + n%8]
    zp_col = 8 * (n_of // 64) + n_of % 8
    zp_j = (n_of % 64) // 8
    zp_shift = 4 * (zp_j // 2 + 4 * (zp_j % 2))
    # row offsets in int64: m * stride_xm and (k / 16) * 2N pass 2**31 on large layers
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        # rows in storage order: kk = 4*(4r + t) + pk
        offs_kk = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        k_of = (
            16 * (offs_kk // 16) + 8 * ((offs_kk % 4) // 2) + 2 * ((offs_kk // 4) % 4) + offs_kk % 2
        )
        mask_k = offs_kk < K
        mask_kn = mask_k[:, None] & mask_n[None, :]
        if HAS_PERM:
            x_col = tl.load(perm_ptr + k_of, mask=mask_k, other=0)
        else:
            x_col = k_of
        a = tl.load(
            x_rows + x_col[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )  # [BM, BK]
        offs_rt = kt * (BLOCK_K // 4) + tl.arange(0, BLOCK_K // 4)
        word_k = (offs_rt // 4).to(tl.int64) * (2 * N) + 4 * (offs_rt % 4)  # [BK/4]
        words = tl.load(
            b_ptr + word_k[:, None] + word_n[None, :],
            mask=(offs_rt < K // 4)[:, None] & mask_w[None, :],
            other=0,
        )  # [BK/4, BN/2]
        q = (words[:, None, :, None] >> shift[None, :, None, :]) & 0xF  # [BK/4, 4, BN/2, 2]
        q = tl.reshape(q, (BLOCK_K, BLOCK_N))

        if HAS_G_IDX or (GROUP_SIZE != -1 and GROUP_SIZE % BLOCK_K != 0):
            if HAS_G_IDX:
                g = tl.load(g_idx_ptr + k_of, mask=mask_k, other=0).to(tl.int64)
            else:
                g = (k_of // GROUP_SIZE).to(tl.int64)
            s = tl.load(s_ptr + g[:, None] * N + s_col[None, :], mask=mask_kn, other=0.0)
            if HAS_ZEROS:
                zw = tl.load(
                    zp_ptr + g[:, None] * (N // 8) + zp_col[None, :], mask=mask_kn, other=0
                )
                z = (zw >> zp_shift[None, :]) & 0xF  # [BK, BN]
            else:
                z = 8
            w = ((q - z).to(tl.float32) * s.to(tl.float32)).to(dtype)
            acc += dot(a, w, INPUT_PRECISION, DOT_F32)
        else:
            if GROUP_SIZE == -1:
                g0 = 0
            else:
                g0 = tl.cast((kt * BLOCK_K) // GROUP_SIZE, tl.int64)
            s = tl.load(s_ptr + g0 * N + s_col, mask=mask_n, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                zw = tl.load(zp_ptr + g0 * (N // 8) + zp_col, mask=mask_n, other=0)
                z = (zw >> zp_shift) & 0xF  # [BN]
            else:
                z = tl.full((BLOCK_N,), 8, tl.int32)
            if DOT_F32:  # interpreter: its int -> bf16 cast is broken; fp32 is exact too
                w = (q - z[None, :]).to(tl.float32)
            else:
                w = (q - z[None, :]).to(dtype)  # exact small integers
            acc += dot(a, w, INPUT_PRECISION, DOT_F32) * s[None, :]

    store_out(out_ptr, acc, bias_ptr, offs_m, n_of, M, N, pid_k, HAS_BIAS, ATOMIC)


_tuned_tiles, _tuned_split = _launch.autotuners(_marlin_kernel)


def marlin_matmul(
    x: torch.Tensor,
    B: torch.Tensor,
    s: torch.Tensor,
    *,
    k: int,
    n: int,
    group_size: int,
    zp: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    bits: int = 4,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """``x @ dequant(B, s[, zp])`` for a Marlin-packed ``[k, n]`` weight, with the Triton kernel.

    Args:
        x: float16 / bfloat16 / float32 ``[..., k]`` (original input-channel order) on CUDA
            (or CPU under ``TRITON_INTERPRET=1``).
        B, s, zp, perm, g_idx: Marlin tensors (module docstring). ``group_size`` -1, or
            the group size (``== k`` means one group, single scale permutation).
        bias: optional float ``[n]``.
        config: a fixed ``triton.Config`` bypassing autotuning (see
            :func:`qtool.kernels.gptq_triton.gptq_matmul`).

    Returns:
        ``[..., n]`` in ``x.dtype`` (fp32 accumulation).

    Any strides are accepted: ``x`` is read through its strides, the other tensors are
    made contiguous (a copy only when they are not).

    Raises:
        ValueError: shapes / dtypes / devices inconsistent with ``k``, ``n``, ``group_size``.
        UnsupportedError: ``bits != 4``; a CPU tensor without the interpreter.
    """
    if bits != 4:
        raise UnsupportedError(
            f"marlin_matmul: bits={bits} is not supported; the Marlin layout here is 4-bit only"
        )
    dims = validate_marlin(
        x, B, s, k=k, n=n, group_size=group_size, zp=zp, perm=perm, g_idx=g_idx, bias=bias
    )
    _launch.ensure_launchable("marlin_matmul", x, _marlin_kernel)
    B, s, zp, perm, g_idx, bias = _launch.contiguous(B, s, zp, perm, g_idx, bias)
    m = dims.m
    x2 = x.reshape(m, k)  # [M, K], any strides
    grouped = marlin_grouped(k, group_size)
    kernel_group_size = group_size if grouped else -1
    plan = _launch.plan(m, config, kernel_group_size)
    out = _launch.allocate_out(plan, m, n, x)  # [M, N]
    if m > 0:
        args = (
            x2,
            B,
            s if zp is None else zp,
            s,
            s if g_idx is None else g_idx,
            s if perm is None else perm,
            s if bias is None else bias,
            out,
            m,
            n,
            k,
            _launch.m_bucket(m),
            x2.stride(0),
            x2.stride(1),
        )
        constexprs = dict(
            GROUP_SIZE=kernel_group_size,
            GROUPED_SCALES=grouped,
            HAS_ZEROS=zp is not None,
            HAS_G_IDX=g_idx is not None,
            HAS_PERM=perm is not None,
            HAS_BIAS=bias is not None,
            **_launch.dot_flags(x.dtype),
        )

        def grid(meta):
            return (
                triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),
                meta["SPLIT_K"],
            )

        _launch.launch(plan, _marlin_kernel, _tuned_tiles, _tuned_split, grid, args, constexprs)
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def reference(x, B, s, *, k, n, group_size, zp=None, perm=None, g_idx=None, bias=None):
    """The torch reference with :func:`marlin_matmul`'s signature."""
    return marlin_matmul_ref(
        x, B, s, k=k, n=n, group_size=group_size, zp=zp, perm=perm, bias=bias, g_idx=g_idx
    )
