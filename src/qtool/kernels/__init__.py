"""Dequant-matmul for packed int4 checkpoints: Triton kernels plus a torch reference.

``Y = X @ dequant(W) (+ bias)`` computed straight from the on-disk tensors of one layer:

* ``"gptq"``: ``qweight``, ``qzeros``, ``scales``, ``g_idx`` (+ ``bias``); meta ``bits``
  (default 4), ``version`` (1 = ``checkpoint_format "gptq"``, 2 = ``"gptq_v2"``),
  ``group_size`` (needed only without ``g_idx``).
* ``"marlin"``: ``B``, ``s`` (+ ``zp``, ``perm``, ``g_idx``, ``bias``); meta ``group_size``
  (``k``/``n`` are read from ``B``).

Kernels: ``"triton"`` (:mod:`.gptq_triton`, :mod:`.marlin_triton`; CUDA, or the CPU
interpreter when ``TRITON_INTERPRET=1`` is set before import), ``"torch"``
(:mod:`.reference`: float32 dequant + matmul), ``"auto"`` (Triton for CUDA tensors when
Triton imports, else torch). The Triton modules are imported lazily, on first use, so that
importing this package never compiles or imports Triton.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

import torch
from torch import nn

from qtool.errors import FormatError, UnsupportedError, UserInputError
from qtool.kernels import reference
from qtool.kernels._validate import interpreting, validate_gptq, validate_marlin

FORMATS = ("gptq", "marlin")
KERNELS = ("auto", "triton", "torch")

_TENSORS = {
    "gptq": ("qweight", "qzeros", "scales", "g_idx", "bias"),
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


def _is_contiguous_groups(g_idx: torch.Tensor, group_size: int | None) -> bool:
    """True when ``g_idx`` is the trivial ``c // group_size`` assignment (one host sync)."""
    if group_size is None:
        return False
    expected = reference.contiguous_groups(g_idx.numel(), group_size, g_idx.device)
    return bool(torch.equal(g_idx.long(), expected))


class PackedLinear(nn.Module):
    """One quantized linear layer kept in its packed checkpoint layout.

    Buffers carry the checkpoint's own tensor names (``qweight``/``qzeros``/``scales``/
    ``g_idx``/``bias`` for GPTQ, ``B``/``s``/``zp``/``perm``/``g_idx``/``bias`` for Marlin),
    so ``state_dict()`` matches the file and ``.to(device)`` moves them. ``forward`` runs
    :func:`quant_matmul` with the layer's ``kernel`` choice.

    A stored ``g_idx`` equal to ``c // group_size`` (GPTQ always writes one) is kept as a
    buffer but not passed to the kernel, which then takes its faster tile-uniform path.

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
        for name, value in t.items():
            if value is not None:
                self.register_buffer(name, value)
        g_idx = t["g_idx"]
        group_size = meta.get("group_size")
        if fmt == "gptq" and group_size is None and g_idx is None:
            group_size = -1
        self._pass_g_idx = g_idx is not None and not _is_contiguous_groups(g_idx, group_size)
        if fmt == "gptq" and not self._pass_g_idx:
            self.meta = {**meta, "group_size": group_size}

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors handed to the kernel (``g_idx`` left out when trivial)."""
        out = {}
        for name in _TENSORS[self.format]:
            value = getattr(self, name, None)
            if value is not None and (name != "g_idx" or self._pass_g_idx):
                out[name] = value
        return out

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
    "quant_matmul",
    "triton_importable",
]
