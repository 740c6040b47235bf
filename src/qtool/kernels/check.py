"""Core of ``qtool check``: run packed layers through a kernel and compare with the torch
reference on seeded random activations.

For every layer ``Y_kernel = quant_matmul(X, ..., kernel=kernel)``, run on the layer in its
kernel layout (:func:`qtool.kernels.layout.kernel_layout`, as inference loads it), is
compared with ``Y_ref = X @ dequant(W) (+ bias)`` computed in float32 by
:mod:`qtool.kernels.reference` from the checkpoint's own tensors.
The error is the worst absolute difference relative to the largest reference magnitude,
``max|Y_kernel - Y_ref| / max|Y_ref|``, and a layer is ok when it is finite and within the
tolerance of the activation dtype. With ``kernel="torch"`` (or ``"auto"`` on CPU) both sides
are the reference, so the check then validates layouts, shapes, the relayout and finiteness.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from qtool.errors import UnsupportedError
from qtool.kernels import available_kernels, kernel_layout, quant_matmul

# Worst error relative to max|Y_ref| accepted per activation dtype: the fp32 kernel differs
# only by summation order; fp16/bf16 add the rounding of dequantized weights and of the
# output (2**-11 and 2**-8 relative), with margin for accumulation order.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}

Layer = tuple[str, Mapping[str, torch.Tensor], Mapping]


@dataclass(frozen=True)
class LayerCheck:
    """Outcome for one layer. ``error`` is the validation message when the layer could not
    be run (then ``worst_rel_error`` is ``inf`` and ``ok`` is False)."""

    name: str
    format: str
    worst_rel_error: float
    ok: bool
    error: str | None = None


def _kernel_meta(fmt: str, meta: Mapping) -> dict:
    """The options :func:`quant_matmul` takes, from a layer's meta (extra keys ignored)."""
    keys = ("bits", "version", "group_size") if fmt == "gptq" else ("group_size",)
    return {k: meta[k] for k in keys if k in meta}


def _in_features(fmt: str, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> int:
    if fmt == "gptq":
        return tensors["qweight"].shape[0] * (32 // meta.get("bits", 4))
    return tensors["B"].shape[0] * 16


def check_layers(
    layers: Mapping[str, Layer],
    *,
    sample: int | None = None,
    kernel: str = "auto",
    seed: int = 0,
    rows: int = 8,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[LayerCheck]:
    """Check packed layers against the reference.

    Args:
        layers: ``name -> (format, tensors, meta)``; format ``"gptq"`` or ``"marlin"``,
            tensors named as in the checkpoint (see :mod:`qtool.kernels`), meta with
            ``bits`` / ``version`` / ``group_size`` as applicable.
        sample: check only this many layers, drawn with ``seed`` (``None``: all).
        kernel: ``"auto"`` | ``"triton"`` | ``"torch"`` (see :func:`quant_matmul`).
        seed: seeds the layer sample and the activations ``X ~ N(0, 1)`` ``[rows, k]``.
        dtype: activation dtype; default float16 on CUDA, float32 elsewhere.
        device: where to run; default: the device of each layer's tensors.
        progress: called with each layer name before it is checked.

    Returns:
        One :class:`LayerCheck` per checked layer, in the order of ``layers``. A layer the
        kernels cannot take (bad shapes, unsupported bits) is reported, not raised.

    Raises:
        UnsupportedError: ``kernel="triton"`` while Triton cannot run in this process.
    """
    if kernel == "triton" and "triton" not in available_kernels():
        raise UnsupportedError(
            "check: kernel='triton' needs triton and a CUDA device (or TRITON_INTERPRET=1); "
            "use kernel='torch' or 'auto'"
        )
    results = []
    for name in sample_names(list(layers), sample, seed):
        if progress is not None:
            progress(name)
        fmt, tensors, meta = layers[name]
        results.append(_check_one(name, fmt, tensors, meta, kernel, seed, rows, dtype, device))
    return results


def sample_names(names: list[str], sample: int | None, seed: int) -> list[str]:
    """The layers a check with ``sample`` and ``seed`` runs, in their given order (all of
    them when ``sample`` is ``None`` or not below their number)."""
    if sample is None or sample >= len(names):
        return names
    keep = set(random.Random(seed).sample(names, sample))
    return [n for n in names if n in keep]


def _check_one(name, fmt, tensors, meta, kernel, seed, rows, dtype, device) -> LayerCheck:
    dev = torch.device(device) if device is not None else next(iter(tensors.values())).device
    tensors = {k: v.to(dev) for k, v in tensors.items()}
    act = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    opts = _kernel_meta(fmt, meta)
    try:
        k = _in_features(fmt, tensors, meta)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(rows, k, generator=gen).to(device=dev, dtype=act)
        y_ref = quant_matmul(x, fmt, tensors, kernel="torch", **opts).float()  # validates
        # the kernel runs on the layer as loaded for inference (PackedLinear): act-order rows
        # sorted by group, so the check covers that relayout as well as the kernel
        loaded, loaded_opts = kernel_layout(fmt, tensors, opts)
        y = quant_matmul(x, fmt, loaded, kernel=kernel, **loaded_opts).float()
    except (ValueError, KeyError, UnsupportedError) as e:
        return LayerCheck(name, fmt, float("inf"), False, f"{type(e).__name__}: {e}")
    scale = y_ref.abs().max().item()
    if not (torch.isfinite(y).all() and torch.isfinite(y_ref).all()):
        return LayerCheck(
            name, fmt, float("inf"), False, "non-finite output (check scales for inf/NaN)"
        )
    err = (y - y_ref).abs().max().item() / max(scale, torch.finfo(torch.float32).tiny)
    return LayerCheck(name, fmt, err, err <= TOLERANCE[act])
