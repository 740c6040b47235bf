"""Ahead-of-time compilation of the kernels for an NVIDIA target, without a GPU.

Triton lowers to PTX with its bundled LLVM and assembles with its bundled ``ptxas``, so a
CPU-only machine can check that every variant and autotune config compiles for, say,
sm_90 (H100/H200) and read the resource usage (registers, spill stack, shared memory)
from the cubin. This catches compile-time errors the CPU interpreter cannot see (it runs
the kernel body as plain Python). It does not run anything: speed and numerics on the
device remain unverified until a GPU run.

The compile mirrors what a JIT launch specializes for the usual call: 16-byte aligned
tensors, ``N``, ``K`` and the row stride of ``x`` divisible by 16, unit column stride.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_PTR = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}


@dataclass(frozen=True)
class Compiled:
    """Resource usage of one compiled kernel variant."""

    name: str
    registers: int
    spill_stack_bytes: int
    shared_bytes: int


_DIVISIBLE_INTS = ("N", "K", "stride_xm")


def _signature(kernel_name: str, act: str, atomic: bool) -> dict[str, str]:
    x, out = _PTR[act], "*fp32" if atomic else _PTR[act]
    ints = {name: "i32" for name in ("M", "N", "K", "M_BUCKET", "stride_xm")}
    ints["stride_xk"] = "constexpr"  # a JIT launch specializes a stride of 1
    if kernel_name == "gptq":
        ptrs = {
            "x_ptr": x,
            "qweight_ptr": "*i32",
            "qzeros_ptr": "*i32",
            "scales_ptr": "*fp16",
            "g_idx_ptr": "*i32",
            "perm_ptr": "*i32",
            "bias_ptr": "*fp16",
            "out_ptr": out,
        }
    else:
        ptrs = {
            "x_ptr": x,
            "b_ptr": "*i32",
            "zp_ptr": "*i32",
            "s_ptr": "*fp16",
            "g_idx_ptr": "*i32",
            "perm_ptr": "*i32",
            "bias_ptr": "*fp16",
            "out_ptr": out,
        }
    return {**ptrs, **ints}


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    regs = int(re.search(r"REG:(\d+)", text).group(1))
    stack = int(re.search(r"STACK:(\d+)", text).group(1))
    return regs, stack


def compile_variant(
    kernel_name: str, act: str, constexprs: dict, config: triton.Config, arch: int = 90
) -> Compiled:
    """Compile ``_gptq_kernel`` / ``_marlin_kernel`` (``kernel_name`` "gptq" / "marlin")
    for ``sm_<arch>`` with activation dtype ``act`` and the given constexprs + config.
    Must run in a process without ``TRITON_INTERPRET=1``."""
    if kernel_name == "gptq":
        from qtool.kernels.gptq_triton import _gptq_kernel as fn
    else:
        from qtool.kernels.marlin_triton import _marlin_kernel as fn
    consts = {**constexprs, **config.kwargs}
    sig = {**_signature(kernel_name, act, consts["ATOMIC"]), **{k: "constexpr" for k in consts}}
    aligned = [
        i
        for i, (name, ty) in enumerate(sig.items())
        if ty.startswith("*") or name in _DIVISIBLE_INTS
    ]
    src = ASTSource(
        fn=fn,
        signature=sig,
        constexprs={**consts, "stride_xk": 1},
        attrs={(i,): [["tt.divisibility", 16]] for i in aligned},
    )
    ck = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    regs, stack = _resource_usage(ck.asm["cubin"])
    name = f"{kernel_name}/{act}/" + ",".join(f"{k}={v}" for k, v in consts.items())
    return Compiled(name, regs, stack, ck.metadata.shared)
