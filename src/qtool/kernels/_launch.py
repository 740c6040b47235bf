"""Host-side pieces shared by the Triton wrappers: launch configs, the small-M split-K
choice, interpreter detection and dtype flags. Imports triton; nothing here runs a kernel.

Autotuning is keyed on ``(M_BUCKET, N, K)`` where ``M_BUCKET`` is ``M`` rounded up to a
power of two (capped at 256): keying on the exact ``M`` would re-tune for every new batch
or prompt length. Under ``TRITON_INTERPRET=1`` (CPU) the autotuner is bypassed and one
small config is launched directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from qtool.errors import UnsupportedError
from qtool.kernels._validate import interpreting

# M at or below this goes to the split-K launch (decode / small batches: too few output
# tiles to fill the GPU without splitting the reduction).
SPLIT_K_MAX_M = 16

# One config for the interpreter. Its cost is per program step (Python overhead per
# op), not per element, so moderate tiles are faster than tiny ones.
INTERPRET_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 1})


def interpret_config(group_size: int) -> triton.Config:
    """The interpreter's config for ``group_size`` (-1: one group): BLOCK_K shrinks to 32
    or 16 when that makes it divide the group size, so the interpreter runs the
    tile-uniform path wherever the GPU autotuner's pruning (:func:`prune_for_groups`) does."""
    if group_size == -1 or group_size % 64 == 0:
        return INTERPRET_CONFIG
    bk = next((b for b in (32, 16) if group_size % b == 0), 64)
    return triton.Config({**INTERPRET_CONFIG.kwargs, "BLOCK_K": bk})


def _cfg(bm: int, bn: int, bk: int, split_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split_k},
        num_warps=warps,
        num_stages=stages,
    )


# M > 16: output-stationary tiles, no split. Every config below compiles for sm_90 without
# register spills in all four kernel variants (GPTQ / Marlin x tile-uniform / per-row
# groups); see qtool.kernels._aot. Bigger tiles (128x128) spilled and were dropped.
TILE_CONFIGS = [
    _cfg(32, 64, 64, 1, 4, 3),
    _cfg(32, 128, 64, 1, 8, 3),
    _cfg(32, 64, 128, 1, 8, 3),
    _cfg(32, 256, 64, 1, 8, 3),
    _cfg(64, 64, 64, 1, 4, 3),
    _cfg(64, 64, 128, 1, 8, 3),
    _cfg(64, 128, 64, 1, 8, 3),
    _cfg(64, 256, 32, 1, 8, 3),
    _cfg(128, 64, 64, 1, 8, 3),
]

# M <= 16: one 16-row tile, the K loop split over SPLIT_K programs that atomically add fp32
# partial sums. SPLIT_K = 1 stays in the list for shapes with many output tiles. Same
# no-spill rule as above.
SPLIT_K_CONFIGS = [
    _cfg(16, bn, bk, sk, warps, stages)
    for bn, bk, warps, stages in (
        (64, 64, 4, 4),
        (128, 64, 4, 4),
        (256, 64, 8, 3),
        (64, 128, 8, 4),
        (32, 128, 4, 4),
    )
    for sk in (1, 2, 4, 8)
] + [_cfg(16, 64, 64, 16, 4, 4), _cfg(16, 128, 64, 16, 4, 4)]


def prune_for_groups(configs, named_args, **kwargs):
    """Autotune pre-filter: keep configs whose BLOCK_K divides the group size, so every K
    tile sits in one group and scales/zeros are loaded once per tile (the fast path). Falls
    back to all configs when none qualifies or groups come from a ``g_idx``."""
    group_size = kwargs.get("GROUP_SIZE", named_args.get("GROUP_SIZE", -1))
    if kwargs.get("HAS_G_IDX", named_args.get("HAS_G_IDX", False)) or group_size == -1:
        return configs
    kept = [c for c in configs if group_size % c.kwargs["BLOCK_K"] == 0]
    return kept or configs


def contiguous(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The tensors a kernel indexes as dense row-major arrays, made contiguous (a no-op,
    no copy, when they already are); ``None`` passes through. Only ``x`` is read through
    its strides."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def m_bucket(m: int) -> int:
    """Autotune key for M: next power of two, capped at 256."""
    return min(triton.next_power_of_2(max(m, 1)), 256)


def ensure_launchable(where: str, x: torch.Tensor, jit_fn) -> None:
    """Fail early, in one line, when a Triton launch cannot work on ``x``'s device."""
    compiled = type(jit_fn).__name__ != "InterpretedFunction"
    if x.is_cuda:
        return
    if not interpreting():
        raise UnsupportedError(
            f"{where}: the Triton kernel needs a CUDA tensor (x is on {x.device}); use "
            f"kernel='torch', or set TRITON_INTERPRET=1 before importing qtool.kernels to "
            f"run it in the (slow) Triton CPU interpreter"
        )
    if compiled:
        raise UnsupportedError(
            f"{where}: TRITON_INTERPRET=1 was set after qtool.kernels compiled its kernels; "
            f"set it before the first import (e.g. in the environment of the process)"
        )


def dot_flags(dtype: torch.dtype) -> dict:
    """Constexprs for ``tl.dot``: IEEE fp32 products for float32 activations (no TF32),
    and fp32 operands in the interpreter for bfloat16: its numpy dot reads bf16 storage as
    integers and its int -> bf16 cast stores integer bits (Triton 3.9). bf16 x bf16
    products are exact in fp32, so the math is unchanged."""
    return {
        "INPUT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "DOT_F32": interpreting() and dtype == torch.bfloat16,
    }


@dataclass(frozen=True)
class Plan:
    """How one call launches: a fixed ``config`` (autotuner bypassed) or ``None`` (tuned),
    and whether partial sums go through an fp32 buffer with atomic adds (split-K)."""

    config: triton.Config | None
    atomic: bool


def plan(m: int, config: triton.Config | None, group_size: int = -1) -> Plan:
    """Pick the launch for ``m`` rows. A fixed config (given, or the interpreter's for
    ``group_size``, the kernel's GROUP_SIZE) splits K iff its SPLIT_K > 1; the autotuned
    path splits for ``m <= SPLIT_K_MAX_M``."""
    if config is None and interpreting():
        config = interpret_config(group_size)
    if config is not None:
        return Plan(config, config.kwargs["SPLIT_K"] > 1)
    return Plan(None, m <= SPLIT_K_MAX_M)


def allocate_out(p: Plan, m: int, n: int, x: torch.Tensor) -> torch.Tensor:
    """Output ``[m, n]``: zeroed fp32 for atomic split-K accumulation, else ``x.dtype``."""
    if p.atomic:
        return torch.zeros((m, n), dtype=torch.float32, device=x.device)
    return torch.empty((m, n), dtype=x.dtype, device=x.device)


def launch(p: Plan, jit_fn, tuned_tiles, tuned_split, grid, args: tuple, constexprs: dict) -> None:
    """Run ``jit_fn`` with the plan's fixed config, or the matching autotuner.
    ``grid(meta)`` maps a config's kwargs to the launch grid."""
    constexprs = {**constexprs, "ATOMIC": p.atomic}
    if p.config is None:
        (tuned_split if p.atomic else tuned_tiles)[grid](*args, **constexprs)
        return
    c = p.config
    jit_fn[grid(c.kwargs)](
        *args, **constexprs, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages
    )


TUNE_KEY = ["M_BUCKET", "N", "K", "GROUP_SIZE", "HAS_G_IDX", "HAS_PERM"]


def autotuners(jit_fn):
    """The two autotuned launchers of one kernel: output tiles (M > 16) and split-K
    (M <= 16, fp32 output zeroed between trial runs)."""
    prune = {"early_config_prune": prune_for_groups}
    tiles = triton.autotune(TILE_CONFIGS, key=TUNE_KEY, prune_configs_by=prune)(jit_fn)
    split = triton.autotune(
        SPLIT_K_CONFIGS, key=TUNE_KEY, prune_configs_by=prune, reset_to_zero=["out_ptr"]
    )(jit_fn)
    return tiles, split
