"""Benchmark the W4A16 dequant-matmul kernels against fp16 cuBLAS on LLM layer shapes.

For every M in 1..128 and (K, N) in the Llama-style list below it times, in one run on one
device, ``torch.matmul`` with an fp16 weight (cuBLAS; the baseline), the Triton GPTQ kernel,
the same kernel on an act-order layer as it is loaded (rows sorted by group, the activations
gathered through ``perm`` in the A load: column ``GPTQ-ao``) and the Triton Marlin kernel
(4-bit, group 128, symmetric, random packed weights built directly), and reports time, speedup over cuBLAS and achieved memory bandwidth (bytes that
must move: packed weight + scales (+ zeros) + activations + output) against the device's
peak. Before timing, each shape is checked against the torch reference once.

Usage::

    python benchmarks/kernel_bench.py                 # needs CUDA; writes benchmarks/results/kernels-<device>.json
    python benchmarks/kernel_bench.py --dry-run       # no GPU: validate the shape list and print the plan
    python benchmarks/kernel_bench.py --compile-check # no GPU: compile every autotune config for sm_90

Timings use ``triton.testing.do_bench`` (median of repeated runs, L2 flushed between runs)
after one untimed call that runs the autotuner for the shape.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from functools import partial
from pathlib import Path

import torch

M_VALUES = (1, 2, 4, 8, 16, 32, 64, 128)
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672))  # (K, N)
GROUP_SIZE = 128
# Peak DRAM bandwidth, GB/s (vendor figures), matched against torch.cuda.get_device_name.
PEAK_GBPS = (
    (r"H200", 4800.0),
    (r"H100.*NVL", 3900.0),
    (r"H100.*PCIe", 2000.0),
    (r"H100", 3350.0),
    (r"A100.*80GB", 2039.0),
    (r"A100", 1555.0),
)
CHECK_TOL = 4e-3  # fp16: worst |y - y_ref| / max|y_ref|
DEVICE = "cuda"


def shape_problems(shapes, group_size: int) -> list[str]:
    """Every reason a (K, N) cannot be run by both layouts (empty list: all fine)."""
    problems = []
    for k, n in shapes:
        if k % 8 or n % 8:
            problems.append(f"(K={k}, N={n}): GPTQ needs K % 8 == 0 and N % 8 == 0")
        if k % 16 or n % 64:
            problems.append(f"(K={k}, N={n}): Marlin needs K % 16 == 0 and N % 64 == 0")
        if k % group_size:
            problems.append(f"(K={k}, N={n}): K must hold whole groups of {group_size}")
    return problems


def peak_gbps(name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    for pattern, gbps in PEAK_GBPS:
        if re.search(pattern, name):
            return gbps
    return None


def random_layer(k: int, n: int, group_size: int, device) -> dict[str, torch.Tensor]:
    """Random packed tensors for both layouts (any int32 word is a valid set of 8 codes)."""
    g = k // group_size
    i32 = {"dtype": torch.int32, "device": device}
    return {
        "qweight": torch.randint(-(2**31), 2**31 - 1, (k // 8, n), **i32),
        "qzeros": torch.full((g, n // 8), 0x77777777, **i32),  # symmetric, v1
        "scales": (torch.rand(g, n, device=device) * 0.01 + 0.001).half(),
        "B": torch.randint(-(2**31), 2**31 - 1, (k // 16, 2 * n), **i32),
        "s": (torch.rand(g, n, device=device) * 0.01 + 0.001).half(),
    }


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def run(args) -> dict:
    import triton
    import triton.testing

    from qtool.kernels import reference
    from qtool.kernels.gptq_triton import gptq_matmul
    from qtool.kernels.marlin_triton import marlin_matmul

    name = torch.cuda.get_device_name()
    peak = peak_gbps(name, args.peak_gbps)
    g = args.group_size
    rows = []
    header = f"{'M':>4} {'K':>6} {'N':>6} | {'cuBLAS':>8} {'GPTQ':>8} {'GPTQ-ao':>8} {'Marlin':>8} ms | {'xGPTQ':>6} {'xGPTQ-ao':>8} {'xMarlin':>7} | {'GPTQ GB/s':>9} {'Marlin GB/s':>11}"
    if peak:
        header += f" | {'%peak G':>7} {'%peak M':>7}"
    print(
        f"device: {name}; peak {peak or 'unknown (pass --peak-gbps)'} GB/s; group {g}; fp16\n{header}"
    )
    for k, n in SHAPES:
        t = random_layer(k, n, g, DEVICE)
        w16 = torch.randn(k, n, device=DEVICE, dtype=torch.float16)
        gptq = partial(
            gptq_matmul, qweight=t["qweight"], qzeros=t["qzeros"], scales=t["scales"], group_size=g
        )
        perm = torch.randperm(k, device=DEVICE).to(torch.int32)  # act-order, sorted by group
        gptq_ao = partial(gptq, perm=perm)
        marlin = partial(marlin_matmul, B=t["B"], s=t["s"], k=k, n=n, group_size=g)
        x = torch.randn(16, k, device=DEVICE, dtype=torch.float16)
        err_g = _rel_err(
            gptq(x),
            reference.gptq_matmul_ref(
                x, t["qweight"], t["qzeros"], t["scales"], None, group_size=g
            ),
        )
        err_ao = _rel_err(
            gptq_ao(x),
            reference.gptq_matmul_ref(
                x, t["qweight"], t["qzeros"], t["scales"], None, group_size=g, perm=perm
            ),
        )
        err_m = _rel_err(
            marlin(x), reference.marlin_matmul_ref(x, t["B"], t["s"], k=k, n=n, group_size=g)
        )
        if max(err_g, err_ao, err_m) > CHECK_TOL:
            print(
                f"WARNING: (K={k}, N={n}) kernel differs from the reference: GPTQ {err_g:.2e}, "
                f"GPTQ act-order {err_ao:.2e}, Marlin {err_m:.2e}"
            )
        scale_bytes = (k // g) * n * 2
        for m in args.m:
            x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
            io = (m * k + m * n) * 2
            times = {}
            calls = {
                "cublas": partial(torch.matmul, x, w16),
                "gptq": partial(gptq, x),
                "gptq_actorder": partial(gptq_ao, x),
                "marlin": partial(marlin, x),
            }
            for label, fn in calls.items():
                fn()  # autotune outside the timed region
                torch.cuda.synchronize()
                times[label] = triton.testing.do_bench(
                    fn, warmup=args.warmup, rep=args.rep, return_mode="median"
                )
            nbytes = {
                "cublas": k * n * 2 + io,
                "gptq": k * n // 2 + scale_bytes + (k // g) * n // 2 + io,
                "gptq_actorder": k * n // 2 + scale_bytes + (k // g) * n // 2 + k * 4 + io,
                "marlin": k * n // 2 + scale_bytes + io,
            }
            gbps = {key: nbytes[key] / (times[key] * 1e-3) / 1e9 for key in times}
            row = {
                "M": m,
                "K": k,
                "N": n,
                "ms": times,
                "gbps": gbps,
                "speedup_vs_cublas": {
                    "gptq": times["cublas"] / times["gptq"],
                    "gptq_actorder": times["cublas"] / times["gptq_actorder"],
                    "marlin": times["cublas"] / times["marlin"],
                },
                "pct_peak": {key: 100 * v / peak for key, v in gbps.items()} if peak else None,
                "check_rel_err_m16": {"gptq": err_g, "gptq_actorder": err_ao, "marlin": err_m},
            }
            rows.append(row)
            line = (
                f"{m:>4} {k:>6} {n:>6} | {times['cublas']:>8.4f} {times['gptq']:>8.4f} "
                f"{times['gptq_actorder']:>8.4f} {times['marlin']:>8.4f}    | "
                f"{row['speedup_vs_cublas']['gptq']:>6.2f} {row['speedup_vs_cublas']['gptq_actorder']:>8.2f} "
                f"{row['speedup_vs_cublas']['marlin']:>7.2f} | "
                f"{gbps['gptq']:>9.0f} {gbps['marlin']:>11.0f}"
            )
            if peak:
                line += f" | {row['pct_peak']['gptq']:>6.1f}% {row['pct_peak']['marlin']:>6.1f}%"
            print(line, flush=True)
    return {
        "device": name,
        "peak_gbps": peak,
        "group_size": g,
        "dtype": "float16",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "timing": f"triton.testing.do_bench median, warmup={args.warmup}ms rep={args.rep}ms",
        "rows": rows,
    }


def compile_check() -> int:
    """Compile every autotune config of both kernels for sm_90 (no GPU) and print usage, for
    the three variants loaded checkpoints use: plain, act-order sorted by group (``perm``:
    the activation gather), and the per-row ``g_idx`` fallback."""
    import warnings

    from qtool.kernels._aot import compile_variant
    from qtool.kernels._launch import SPLIT_K_CONFIGS, TILE_CONFIGS

    warnings.filterwarnings("ignore")
    common = {"HAS_BIAS": False, "INPUT_PRECISION": "tf32", "DOT_F32": False}
    bases = {
        "gptq": dict(BITS=4, GROUP_SIZE=GROUP_SIZE, ZERO_OFFSET=1, HAS_ZEROS=True, **common),
        "marlin": dict(GROUP_SIZE=GROUP_SIZE, GROUPED_SCALES=True, HAS_ZEROS=False, **common),
    }
    spills = 0
    for kernel, base in bases.items():
        for g_idx, perm in ((False, False), (False, True), (True, False)):
            for atomic, configs in ((False, TILE_CONFIGS), (True, SPLIT_K_CONFIGS)):
                for cfg in configs:
                    consts = {**base, "HAS_G_IDX": g_idx, "HAS_PERM": perm, "ATOMIC": atomic}
                    c = compile_variant(kernel, "float16", consts, cfg)
                    kw = cfg.kwargs
                    spills += c.spill_stack_bytes > 0
                    print(
                        f"{kernel:6} g_idx={g_idx!s:5} perm={perm!s:5} "
                        f"{kw['BLOCK_M']:>3}x{kw['BLOCK_N']:<3}x{kw['BLOCK_K']:<3} "
                        f"split={kw['SPLIT_K']:<2} warps={cfg.num_warps} stages={cfg.num_stages}: "
                        f"regs={c.registers} spill={c.spill_stack_bytes}B smem={c.shared_bytes}B",
                        flush=True,
                    )
    print(f"{spills} variant(s) spill registers")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the shape list and print the plan; no GPU needed",
    )
    p.add_argument(
        "--compile-check",
        action="store_true",
        help="compile all autotune configs for sm_90; no GPU needed",
    )
    p.add_argument(
        "--peak-gbps",
        type=float,
        default=None,
        help="device peak bandwidth (default: from the device name)",
    )
    p.add_argument("--group-size", type=int, default=GROUP_SIZE)
    p.add_argument("--m", type=int, nargs="+", default=list(M_VALUES), help="batch sizes to time")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)

    problems = shape_problems(SHAPES, args.group_size)
    if problems:
        print("invalid shape list:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    if args.dry_run:
        print(
            f"shape list ok: {len(SHAPES)} (K, N) x {len(args.m)} M = {len(SHAPES) * len(args.m)} points; "
            f"group {args.group_size}; kernels: cuBLAS fp16, GPTQ (Triton), GPTQ act-order "
            f"(Triton, rows sorted + perm), Marlin (Triton)"
        )
        for k, n in SHAPES:
            print(
                f"  K={k:>6} N={n:>6}: packed weight {k * n / 2 / 2**20:.1f} MiB vs fp16 {k * n * 2 / 2**20:.1f} MiB"
            )
        return 0
    if args.compile_check:
        return compile_check()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print(
            "TRITON_INTERPRET=1 is set: the interpreter cannot be benchmarked; unset it",
            file=sys.stderr,
        )
        return 2
    if not torch.cuda.is_available():
        print(
            "CUDA is not available: nothing to benchmark (use --dry-run to validate the shape list, "
            "--compile-check to compile the kernels for sm_90)"
        )
        return 0
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", result["device"]).strip("-").lower()
    path = args.out / f"kernels-{slug}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
