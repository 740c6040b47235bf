"""Triton GEMM ``Y = X @ dequant(W) (+ bias)`` reading the GPTQ checkpoint layout as stored.

Layout (``shared/refvectors/README.md`` §3, ``per = 32 / bits`` fields per int32):

========= ============ ============== ================================================
tensor    dtype        shape          content
========= ============ ============== ================================================
qweight   int32        [k/per, n]     field ``i`` of ``qweight[r, j]`` = code of row ``per*r+i``
qzeros    int32        [G, n/per]     field ``i`` of ``qzeros[g, c]`` = stored zero of column
                                      ``per*c+i`` (v1: ``z - 1``, v2: ``z``); ``None``: 2**(bits-1)
scales    fp16/bf16/32 [G, n]         row = group id
g_idx     int32/int64  [k]            group of every row (act-order: non-monotone), or ``None``
perm      int32/int64  [k]            optional: row ``r`` is input channel ``perm[r]`` (kernel
                                      layout of act-order checkpoints, rows sorted by group)
========= ============ ============== ================================================

Kernel design. Each program owns a ``[BLOCK_M, BLOCK_N]`` output tile and walks K in
``BLOCK_K`` steps (split-K: every ``SPLIT_K``-th step, fp32 partials added atomically).
Per step it loads ``x [BLOCK_M, BLOCK_K]`` and the ``[BLOCK_K/per, BLOCK_N]`` packed words
(contiguous along n: coalesced, each word read once), unpacks them in registers with a
broadcast shift ``[BLOCK_K/per, per, BLOCK_N]`` and a row-major reshape to
``[BLOCK_K, BLOCK_N]`` (row ``per*r + i`` is field ``i`` of word row ``r``). Compared with
loading word ``k // per`` for every row (8 redundant int32 loads per word), this halves the
registers and cuts shared memory ~4x in the sm_90 compile, with no spills. Two dequant
paths, chosen at compile time:

* tile-uniform groups (no ``g_idx`` and ``BLOCK_K`` divides ``group_size``, or one group):
  the exact integers ``q - z`` (|.| <= 2**bits) go through the MMA in the activation dtype
  and the fp32 partial is scaled per column, so scales/zeros load once per tile;
* per-row groups (groups smaller than ``BLOCK_K``, or a ``g_idx``): the group of every row
  is computed (or loaded) and ``(q - z) * s`` is formed per element in fp32, then rounded
  to the activation dtype for the MMA.

Act-order checkpoints do not take the ``g_idx`` gather: :mod:`qtool.kernels.layout` sorts
their rows by group once at load time (as Marlin and exllama do) and passes ``perm``, so
the groups are contiguous again and the kernel gathers the activation columns
``x[:, perm]`` in its A load instead. A ``g_idx`` reaches the kernel only for a checkpoint
whose groups are not all ``group_size`` channels (never written by GPTQ): the fallback.

Row offsets (``m * stride_xm``, word row ``* N``, group ``* N``) are computed in int64, so
``M * K`` or ``K * N / per`` beyond 2**31 elements address correctly.

Activations fp16 / bf16 (fp32 too, with IEEE products); accumulation always fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qtool.kernels import _launch
from qtool.kernels._device import dot, store_out
from qtool.kernels._validate import validate_gptq
from qtool.kernels.reference import gptq_matmul_ref


@triton.jit
def _gptq_kernel(
    x_ptr,
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
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
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    ZERO_OFFSET: tl.constexpr,
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
    PER: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    MIDPOINT: tl.constexpr = 1 << (BITS - 1)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # M tiles vary fastest, so programs sharing a weight tile run together (L2 reuse).
    num_pid_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_pid_m
    pid_n = pid // num_pid_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    zero_col = offs_n // PER  # [BN] word of qzeros holding column n
    zero_shift = (offs_n % PER) * BITS
    dtype = x_ptr.dtype.element_ty
    # row offsets in int64: m * stride_xm and (k / PER) * N pass 2**31 on large layers
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        mask_kn = mask_k[:, None] & mask_n[None, :]
        if HAS_PERM:  # rows sorted by group: row k of the weight is input channel perm[k]
            x_col = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
        else:
            x_col = offs_k
        a = tl.load(
            x_rows + x_col[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )  # [BM, BK]
        # each packed word is loaded once and unpacked in registers
        offs_kw = kt * (BLOCK_K // PER) + tl.arange(0, BLOCK_K // PER)
        words = tl.load(
            qweight_ptr + offs_kw.to(tl.int64)[:, None] * N + offs_n[None, :],
            mask=(offs_kw < K // PER)[:, None] & mask_n[None, :],
            other=0,
        )  # [BK/PER, BN]
        q = (
            words[:, None, :] >> (tl.arange(0, PER) * BITS)[None, :, None]
        ) & MAXQ  # [BK/PER, PER, BN]
        q = tl.reshape(q, (BLOCK_K, BLOCK_N))  # row PER*r + i = field i of word row r

        if HAS_G_IDX or (GROUP_SIZE != -1 and GROUP_SIZE % BLOCK_K != 0):
            if HAS_G_IDX:
                g = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
            else:
                g = (offs_k // GROUP_SIZE).to(tl.int64)
            s = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :], mask=mask_kn, other=0.0)
            if HAS_ZEROS:
                zw = tl.load(
                    qzeros_ptr + g[:, None] * (N // PER) + zero_col[None, :], mask=mask_kn, other=0
                )
                z = ((zw >> zero_shift[None, :]) & MAXQ) + ZERO_OFFSET  # [BK, BN]
            else:
                z = MIDPOINT
            w = ((q - z).to(tl.float32) * s.to(tl.float32)).to(dtype)
            acc += dot(a, w, INPUT_PRECISION, DOT_F32)
        else:
            if GROUP_SIZE == -1:
                g0 = 0
            else:
                g0 = tl.cast((kt * BLOCK_K) // GROUP_SIZE, tl.int64)
            s = tl.load(scales_ptr + g0 * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                zw = tl.load(qzeros_ptr + g0 * (N // PER) + zero_col, mask=mask_n, other=0)
                z = ((zw >> zero_shift) & MAXQ) + ZERO_OFFSET  # [BN]
            else:
                z = tl.full((BLOCK_N,), MIDPOINT, tl.int32)
            if DOT_F32:  # interpreter: its int -> bf16 cast is broken; fp32 is exact too
                w = (q - z[None, :]).to(tl.float32)
            else:
                w = (q - z[None, :]).to(dtype)  # exact small integers
            acc += dot(a, w, INPUT_PRECISION, DOT_F32) * s[None, :]

    store_out(out_ptr, acc, bias_ptr, offs_m, offs_n, M, N, pid_k, HAS_BIAS, ATOMIC)


_tuned_tiles, _tuned_split = _launch.autotuners(_gptq_kernel)


def gptq_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor | None,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    *,
    bits: int = 4,
    version: int = 1,
    group_size: int | None = None,
    perm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """``x @ dequant(qweight, qzeros, scales, g_idx) (+ bias)`` with the Triton kernel.

    Args:
        x: float16 / bfloat16 / float32 ``[..., k]`` on CUDA (or CPU under
            ``TRITON_INTERPRET=1``).
        qweight, qzeros, scales, g_idx: GPTQ tensors (module docstring); ``version`` 1 or 2
            says how ``qzeros`` stores the zero. ``g_idx=None`` means contiguous groups of
            ``group_size`` (-1: one group) -- pass it that way when the stored ``g_idx`` is
            the trivial ``c // group_size``, which selects the faster tile-uniform path.
        perm: optional int ``[k]``: row ``r`` of the unpacked ``qweight`` (and ``g_idx[r]``)
            belongs to input channel ``perm[r]``, and the kernel reads ``x[..., perm]``.
            Act-order layers sorted by group this way (:func:`qtool.kernels.layout.kernel_layout`)
            need no ``g_idx`` and take the tile-uniform path.
        bias: optional float ``[n]``.
        config: a fixed ``triton.Config`` (keys BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K) that
            bypasses autotuning; SPLIT_K > 1 selects the atomic split-K reduction.

    Returns:
        ``[..., n]`` in ``x.dtype`` (fp32 accumulation).

    Any strides are accepted: ``x`` is read through its strides, the other tensors are
    made contiguous (a copy only when they are not).

    Raises:
        ValueError: inconsistent shapes / dtypes / devices (the message names the tensor).
        UnsupportedError: bits not in {2, 4, 8}; a CPU tensor without the interpreter.
    """
    dims = validate_gptq(
        x,
        qweight,
        qzeros,
        scales,
        g_idx,
        bits=bits,
        version=version,
        group_size=group_size,
        perm=perm,
        bias=bias,
    )
    _launch.ensure_launchable("gptq_matmul", x, _gptq_kernel)
    qweight, qzeros, scales, g_idx, perm, bias = _launch.contiguous(
        qweight, qzeros, scales, g_idx, perm, bias
    )
    m, k, n = dims.m, dims.k, dims.n
    x2 = x.reshape(m, k)  # [M, K], any strides
    kernel_group_size = -1 if dims.group_size is None else dims.group_size
    plan = _launch.plan(m, config, kernel_group_size)
    out = _launch.allocate_out(plan, m, n, x)  # [M, N]
    if m > 0 and n > 0:
        args = (
            x2,
            qweight,
            scales if qzeros is None else qzeros,
            scales,
            scales if g_idx is None else g_idx,
            scales if perm is None else perm,
            scales if bias is None else bias,
            out,
            m,
            n,
            k,
            _launch.m_bucket(m),
            x2.stride(0),
            x2.stride(1),
        )
        constexprs = dict(
            BITS=bits,
            GROUP_SIZE=kernel_group_size,
            ZERO_OFFSET=1 if version == 1 else 0,
            HAS_ZEROS=qzeros is not None,
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

        _launch.launch(plan, _gptq_kernel, _tuned_tiles, _tuned_split, grid, args, constexprs)
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def reference(
    x,
    qweight,
    qzeros,
    scales,
    g_idx=None,
    *,
    bits=4,
    version=1,
    group_size=None,
    perm=None,
    bias=None,
):
    """The torch reference with :func:`gptq_matmul`'s signature (float32 dequant + matmul)."""
    return gptq_matmul_ref(
        x,
        qweight,
        qzeros,
        scales,
        g_idx,
        bits=bits,
        version=version,
        bias=bias,
        group_size=group_size,
        perm=perm,
    )
