"""AWQ checkpoint layout, GEMM version (AutoAWQ ``WQLinear_GEMM``; read by vLLM ``awq`` /
``awq_marlin`` and transformers ``AwqConfig``). Spec: ``shared/refvectors/README.md`` §4.

Tensors of one quantized linear (4-bit only):

========== ======== ============ =========================================================
suffix     dtype    shape        content
========== ======== ============ =========================================================
qweight    int32    [k, n/8]     codes packed along n with the interleave ``ORDER``:
                                 nibble p of ``qweight[c, w]`` = ``codes[8w + ORDER[p], c]``
qzeros     int32    [G, n/8]     logical zeros (no offset), same interleave
scales     float16  [G, n]       row = group id
bias       float16  [n]          only when the layer has a bias
========== ======== ============ =========================================================

``ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``. There is no ``g_idx``: AWQ cannot store act-order.
The format always carries zero points (``zero_point: true``), so only asymmetric layers are
accepted (a symmetric layer would come back with explicit zeros of 8: use gptq).
``group_size == -1`` is refused: vLLM's ``awq`` kernel sizes its tensors with
``k // group_size``.
"""

from __future__ import annotations

import torch

from qtool.errors import FormatError, UnsupportedError
from qtool.pack._bits import (
    bias_tensors,
    expect_shape,
    fp16_scales,
    group_size_reason,
    not_multiple,
    pack_words,
    read_bias,
    unpack_words,
)
from qtool.qtensor import QuantizedWeight

NAME = "awq"
TENSOR_SUFFIXES = ("qweight", "qzeros", "scales")
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble p holds column 8w + ORDER[p]
_INVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column 8w + m sits in nibble _INVERSE_ORDER[m]
# default act-order kind: the format has no g_idx, so GPTQ act-order keeps its groups fixed
ACT_ORDER = "static"


def check_options(bits: int, group_size: int, sym: bool, act_order: bool, **options) -> str | None:
    """Config-level reason why AWQ GEMM cannot store these options, or ``None``."""
    if bits != 4:
        return f"bits={bits}: AWQ GEMM checkpoints are 4-bit only"
    if sym:
        return "symmetric weights: AWQ GEMM checkpoints store zero points (zero_point=true)"
    if act_order:
        return "act-order: AWQ checkpoints have no g_idx to store the column order"
    if group_size == -1:
        return "AWQ needs a positive group size (vLLM's awq kernel divides k by it), not -1 (per channel)"
    if group_size <= 0:
        return f"group_size={group_size} is invalid (AWQ needs a positive group size)"
    return None


def check_layer(
    n: int, k: int, bits: int, group_size: int, sym: bool, act_order: bool, **options
) -> str | None:
    """Reason why a ``[n, k]`` layer cannot be stored as AWQ GEMM, or ``None``."""
    return (
        check_options(bits, group_size, sym, act_order, **options)
        or not_multiple("n", n, 8, "AWQ packs 8 outputs per int32")
        or group_size_reason(k, group_size)
    )


def _interleave_pack(values: torch.Tensor) -> torch.Tensor:
    """uint8 ``[rows, n]`` -> int32 ``[rows, n/8]`` with the AWQ interleave."""
    rows, n = values.shape
    blocks = values.reshape(rows, n // 8, 8)[:, :, list(ORDER)]  # [rows, n/8, 8] nibble order
    return pack_words(blocks.reshape(rows, n), 4)


def _interleave_unpack(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[rows, n/8]`` -> uint8 ``[rows, n]``, undoing the AWQ interleave."""
    rows, w = words.shape
    nibbles = unpack_words(words, 4).reshape(rows, w, 8)  # [rows, n/8, 8] nibble order
    return nibbles[:, :, list(_INVERSE_ORDER)].reshape(rows, w * 8).contiguous()


def pack(qw: QuantizedWeight, **options) -> dict[str, torch.Tensor]:
    """On-disk tensors of one linear (see the module docstring for layouts).

    Raises:
        UnsupportedError: shape or options outside the format (see :func:`check_layer`).
    """
    n, k = qw.shape
    reason = check_layer(n, k, qw.bits, qw.group_size, qw.sym, qw.g_idx is not None)
    if reason:
        raise UnsupportedError(f"awq: {reason}")
    assert qw.zeros is not None
    return {
        "qweight": _interleave_pack(qw.codes.T),  # [k, n] -> [k, n/8]
        "qzeros": _interleave_pack(qw.zeros.T),  # [G, n] -> [G, n/8]
        "scales": qw.scales.T.contiguous(),  # [G, n]
        **bias_tensors(qw.bias),
    }


def unpack(
    tensors: dict[str, torch.Tensor],
    *,
    bits: int,
    group_size: int,
    sym: bool,
    out_features: int,
    in_features: int,
    **options,
) -> QuantizedWeight:
    """Exact inverse of :func:`pack`.

    Raises:
        FormatError: options outside the format or tensors of the wrong shape/dtype.
    """
    n, k, where = out_features, in_features, "awq unpack"
    reason = check_layer(n, k, bits, group_size, sym, False)
    if reason:
        raise FormatError(f"{where}: {reason}")
    G = k // group_size
    qweight = expect_shape(tensors, "qweight", (k, n // 8), torch.int32, where)
    qzeros = expect_shape(tensors, "qzeros", (G, n // 8), torch.int32, where)
    scales = fp16_scales(expect_shape(tensors, "scales", (G, n), "float", where), where)
    return QuantizedWeight(
        codes=_interleave_unpack(qweight).T.contiguous(),  # [k, n] -> [n, k]
        scales=scales.T.contiguous(),  # [n, G]
        zeros=_interleave_unpack(qzeros).T.contiguous(),  # [G, n] -> [n, G]
        g_idx=None,
        bits=4,
        group_size=group_size,
        sym=False,
        bias=read_bias(tensors, n, where),
    )


def quantization_config(bits: int, group_size: int, sym: bool, act_order: bool, **options) -> dict:
    """``config.json -> quantization_config`` as AutoAWQ writes it (spec §4.4); the keys
    ``bits``/``group_size``/``zero_point`` are the ones vLLM ``awq_marlin`` requires."""
    return {
        "quant_method": "awq",
        "zero_point": True,
        "group_size": group_size,
        "bits": bits,
        "version": "gemm",
        "modules_to_not_convert": None,
    }


def options_from_config(cfg: dict) -> dict:
    """``{bits, group_size, sym, act_order}`` from an AWQ ``quantization_config`` (also the
    legacy ``w_bit`` / ``q_group_size`` keys of ``quant_config.json``)."""
    if cfg.get("quant_method", "awq") != "awq":
        raise FormatError(f"awq: quant_method {cfg.get('quant_method')!r} is not 'awq'")
    version = str(cfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise FormatError(f"awq: version {version!r} is not supported; qtool reads the GEMM layout")
    if not cfg.get("zero_point", True):
        raise FormatError("awq: zero_point=false is not a GEMM checkpoint")
    return {
        "bits": int(_first_key(cfg, ("bits", "w_bit"))),
        "group_size": int(_first_key(cfg, ("group_size", "q_group_size"))),
        "sym": False,
        "act_order": False,
    }


def _first_key(cfg: dict, keys: tuple[str, ...]):
    for key in keys:
        if key in cfg:
            return cfg[key]
    raise FormatError(f"awq: quantization_config has none of the keys {keys}")


def layer_shape(tensors: dict[str, torch.Tensor], *, bits: int = 4, **options) -> tuple[int, int]:
    """``(out_features, in_features)`` of a stored layer: ``qweight`` is ``[k, n / 8]``."""
    k, cols = tensors["qweight"].shape
    return cols * 32 // bits, k
