"""Triton device helpers shared by the dequant-matmul kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot(a, w, INPUT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """``a @ w`` in fp32 (the compiler folds a following ``acc +=`` into the MMA).
    ``DOT_F32`` feeds fp32 operands: exact for bf16 inputs, and only needed by the CPU
    interpreter, whose numpy dot reads bf16 storage as integers."""
    if DOT_F32:
        a = a.to(tl.float32)
        w = w.to(tl.float32)
    return tl.dot(a, w, input_precision=INPUT_PRECISION, out_dtype=tl.float32)


@triton.jit
def store_out(
    out_ptr,
    acc,
    bias_ptr,
    offs_m,
    offs_n,
    M,
    N,
    pid_k,
    HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """Epilogue for a ``[BLOCK_M, BLOCK_N]`` fp32 tile of the contiguous ``[M, N]`` output:
    bias (added once, by the ``pid_k == 0`` split), then a cast-and-store, or an fp32
    atomic add into the split-K buffer."""
    mask_n = offs_n < N
    # a compile-time flag, then a runtime branch: they cannot be merged into one `if`
    if HAS_BIAS:  # noqa: SIM102
        if pid_k == 0:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += bias[None, :]
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]  # M * N may pass 2**31
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
