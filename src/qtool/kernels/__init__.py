"""Dequant-matmul for packed int4 checkpoints: Triton kernels plus a torch reference.

``Y = X @ dequant(W) (+ bias)`` computed straight from the on-disk tensors of one layer:

* ``"gptq"``: ``qweight``, ``qzeros``, ``scales``, ``g_idx`` (+ ``perm``, ``bias``); meta
  ``bits`` (default 4), ``version`` (1 = ``checkpoint_format "gptq"``, 2 = ``"gptq_v2"``),
  ``group_size`` (needed only without ``g_idx``). ``perm`` is not a checkpoint tensor: it
  comes from :func:`~qtool.kernels.layout.kernel_layout`, which sorts act-order rows by
  group.
* ``"marlin"``: ``B``, ``s`` (+ ``zp``, ``perm``, ``g_idx``, ``bias``); meta ``group_size``
  (``k``/``n`` are read from ``B``).

Kernels: ``"triton"`` (:mod:`.gptq_triton`, :mod:`.marlin_triton`; CUDA, or the CPU
interpreter when ``TRITON_INTERPRET=1`` is set before import), ``"torch"``
(:mod:`.reference`: float32 dequant + matmul), ``"auto"`` (Triton for CUDA tensors when
Triton imports, else torch). The Triton modules are imported lazily, on first use, so that
importing this package never compiles or imports Triton.

Layers loaded for inference (:class:`PackedLinear`, ``qtool check``) first go through
:func:`~qtool.kernels.layout.kernel_layout`, so act-order checkpoints reach the kernels
with their rows sorted by group and take the tile-uniform scale path.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

import torch
from torch import nn

from qtool.errors import FormatError, UnsupportedError, UserInputError
from qtool.kernels import reference
from qtool.kernels._validate import interpreting, validate_gptq, validate_marlin
from qtool.kernels.layout import kernel_layout

FORMATS = ("gptq", "marlin")
KERNELS = ("auto", "triton", "torch")

_TENSORS = {
    "gptq": ("qweight", "qzeros", "scales", "g_idx", "perm", "bias"),
    "marlin": ("B", "s", "zp", "perm", "g_idx", "bias"),
}
_META = {"gptq": ("bits", "version", "group_size"), "marlin": ("group_size",)}


def triton_importable() -> bool:
    """True when ``import triton`` succeeds."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def available_kernels() -> tuple[str, ...]:
    """Kernels usable in this process: always ``"torch"``; ``"triton"`` when Triton
    imports and either a CUDA device is visible or ``TRITON_INTERPRET=1`` is set."""
    names = ["torch"]
    if triton_importable() and (torch.cuda.is_available() or interpreting()):
        names.append("triton")
    return tuple(names)


def _resolve_kernel(kernel: str, x: torch.Tensor) -> str:
    if kernel not in KERNELS:
        raise UserInputError(f"quant_matmul: kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "auto":
        return "triton" if x.is_cuda and triton_importable() else "torch"
    if kernel == "triton" and not triton_importable():
        raise UnsupportedError(
            "quant_matmul: kernel='triton' needs the triton package; install it or use kernel='torch'"
        )
    return kernel


def _split(fmt: str, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> tuple[dict, dict]:
    if fmt not in FORMATS:
        raise UnsupportedError(f"quant_matmul: format must be one of {FORMATS}, got {fmt!r}")
    unknown = set(tensors) - set(_TENSORS[fmt])
    if unknown:
        raise ValueError(
            f"quant_matmul: unexpected {fmt} tensors {sorted(unknown)}; expected {list(_TENSORS[fmt])}"
        )
    unknown_meta = set(meta) - set(_META[fmt])
    if unknown_meta:
        raise ValueError(
            f"quant_matmul: unexpected {fmt} options {sorted(unknown_meta)}; expected {list(_META[fmt])}"
        )
    return {name: tensors.get(name) for name in _TENSORS[fmt]}, dict(meta)


def _call(fmt: str, t: dict, meta: dict, x: torch.Tensor) -> tuple[tuple, dict]:
    """Positional and keyword arguments of the format's matmul functions (validated)."""
    if fmt == "gptq":
        args = (x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
        kw = {
            "bits": meta.get("bits", 4),
            "version": meta.get("version", 1),
            "group_size": meta.get("group_size"),
            "perm": t["perm"],
            "bias": t["bias"],
        }
        validate_gptq(*args, **kw)
        return args, kw
    if "group_size" not in meta:
        raise ValueError("marlin needs the group_size option (-1 for per-channel)")
    B, s = t["B"], t["s"]
    if B.dim() != 2:
        raise ValueError(f"marlin B must be int32 [k/16, 2n], got shape {list(B.shape)}")
    kw = {
        "k": B.shape[0] * 16,
        "n": B.shape[1] // 2,
        "group_size": meta["group_size"],
        "zp": t["zp"],
        "perm": t["perm"],
        "g_idx": t["g_idx"],
        "bias": t["bias"],
    }
    validate_marlin(x, B, s, **kw)
    return (x, B, s), kw


def quant_matmul(
    x: torch.Tensor,
    fmt: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    kernel: str = "auto",
    **meta,
) -> torch.Tensor:
    """``x [..., k] @ dequant(W) (+ bias)`` -> ``[..., n]`` in ``x.dtype``.

    Args:
        x: float16 / bfloat16 / float32 activations, last dim = in_features.
        fmt: ``"gptq"`` or ``"marlin"``; ``tensors`` and ``meta`` as in the module doc.
        kernel: ``"auto"`` | ``"triton"`` | ``"torch"``.

    Raises:
        ValueError: tensors inconsistent with the layout.
        UnsupportedError: unknown format, Triton unavailable, or a CPU tensor with
            ``kernel="triton"`` and no ``TRITON_INTERPRET=1``.
    """
    t, meta = _split(fmt, tensors, meta)
    chosen = _resolve_kernel(kernel, x)
    args, kw = _call(fmt, t, meta, x)
    if chosen == "torch":
        fn = reference.gptq_matmul_ref if fmt == "gptq" else reference.marlin_matmul_ref
    elif fmt == "gptq":
        from qtool.kernels.gptq_triton import gptq_matmul as fn
    else:
        from qtool.kernels.marlin_triton import marlin_matmul as fn
    return fn(*args, **kw)


class PackedLinear(nn.Module):
    """One quantized linear layer kept in its packed checkpoint layout.

    Buffers hold the layer in its kernel layout (:func:`~qtool.kernels.layout.kernel_layout`),
    under the checkpoint's tensor names (``qweight``/``qzeros``/``scales``/``bias`` for GPTQ,
    ``B``/``s``/``zp``/``perm``/``bias`` for Marlin), so ``.to(device)`` moves them and
    ``forward`` runs :func:`quant_matmul` on them with the layer's ``kernel`` choice. They
    differ from the file in two ways: a ``g_idx`` equal to ``c // group_size`` (GPTQ always
    writes one; Marlin's sorted one) is dropped, and an act-order GPTQ layer holds its
    ``qweight`` rows sorted by group plus ``perm`` in place of ``g_idx``. Both keep the
    kernel on its tile-uniform path; a ``g_idx`` with unequal groups stays (per-row path).

    Raises:
        FormatError: the tensors do not fit the format (message from the layout check).
    """

    def __init__(
        self, fmt: str, tensors: Mapping[str, torch.Tensor], *, kernel: str = "auto", **meta
    ):
        super().__init__()
        if kernel not in KERNELS:
            raise UserInputError(f"PackedLinear: kernel must be one of {KERNELS}, got {kernel!r}")
        t, meta = _split(fmt, tensors, meta)
        self.format, self.kernel, self.meta = fmt, kernel, meta
        if fmt == "gptq":
            per = 32 // meta.get("bits", 4)
            self.in_features, self.out_features = t["qweight"].shape[0] * per, t["qweight"].shape[1]
            ref_dtype = t["scales"].dtype
        else:
            self.in_features, self.out_features = t["B"].shape[0] * 16, t["B"].shape[1] // 2
            ref_dtype = t["s"].dtype
        probe = torch.empty(
            0, self.in_features, dtype=ref_dtype, device=next(iter(tensors.values())).device
        )
        try:
            _call(fmt, t, meta, probe)
        except ValueError as e:
            raise FormatError(f"PackedLinear: tensors do not match the {fmt} layout: {e}") from e
        tensors, self.meta = kernel_layout(fmt, t, meta)
        for name, value in tensors.items():
            self.register_buffer(name, value)

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors handed to the kernel (the buffers, in the kernel layout)."""
        return {name: buf for name, buf in self.named_buffers(recurse=False)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_matmul(x, self.format, self.packed_tensors(), kernel=self.kernel, **self.meta)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.meta.items())
        return f"{self.format}, in_features={self.in_features}, out_features={self.out_features}, {opts}, kernel={self.kernel}"


__all__ = [
    "FORMATS",
    "KERNELS",
    "PackedLinear",
    "available_kernels",
    "kernel_layout",
    "quant_matmul",
    "triton_importable",
]
