"""GPTQ checkpoint layout (AutoGPTQ / GPTQModel; read by vLLM ``gptq`` / ``gptq_marlin``,
transformers + GPTQModel). Spec: ``shared/refvectors/README.md`` §3.

Tensors of one quantized linear (``per = 32 // bits`` fields per int32 word; 8 for 4-bit,
4 for 8-bit; field ``i`` = bits ``bits*i ..``):

========== ======== ================ =====================================================
suffix     dtype    shape            content
========== ======== ================ =====================================================
qweight    int32    [k/per, n]       codes packed along k: field i of ``qweight[r, j]`` =
                                     ``codes[j, per*r + i]``; rows in the original input
                                     order, also with act-order
qzeros     int32    [G, n/per]       stored zeros packed along n: field i of
                                     ``qzeros[gr, c]`` = stored zero of group gr, output
                                     ``per*c + i``
scales     float16  [G, n]           row = group id
g_idx      int32    [k]              group id of every input channel (always written;
                                     non-monotone with act-order)
bias       float16  [n]              only when the layer has a bias
========== ======== ================ =====================================================

Zero storage (option ``version``):

* version 1, ``checkpoint_format``/``format`` ``"gptq"``: stored field = ``z - 1``; readers
  add 1 back. Symmetric 4-bit -> every word ``0x77777777``.
* version 2, ``"gptq_v2"`` (GPTQModel): stored field = ``z``. Symmetric -> ``0x88888888``.

Decision on the v1 asymmetric ``z == 0`` corner (spec §3.2): a zero of 0 has no v1 field
(``-1``); GPTQModel's whole-word subtraction borrows into the neighbouring field and
AutoGPTQ's cast sets all higher bits, so nibble-wise readers (vLLM, AutoGPTQ) decode wrong
zeros. qtool never writes that:

* ``version=None`` (the default) resolves to 1 for symmetric layers (universally read)
  and to **2 for asymmetric layers** (vLLM's ``gptq`` method honours ``gptq_v2``;
  transformers/GPTQModel read it natively).
* An explicit ``version=1`` with asymmetric zeros is allowed (``check_options`` passes,
  since it depends on the data), but :func:`pack` raises ``UnsupportedError`` naming
  ``--gptq-version 2`` if any zero equals 0.
* :func:`unpack` of v1 raises ``FormatError`` on a stored field of ``2**bits - 1`` (it
  would mean ``z = 2**bits``, which no quantizer emits: the mark of the corrupted corner).
"""

from __future__ import annotations

import re

import torch

from qtool.errors import FormatError, UnsupportedError, UserInputError
from qtool.pack._bits import (
    bias_tensors,
    canonical_g_idx,
    contiguous_g_idx,
    expect_shape,
    fp16_scales,
    group_count,
    group_size_reason,
    not_multiple,
    pack_words,
    per_word,
    read_bias,
    unpack_words,
)
from qtool.qtensor import QuantizedWeight

NAME = "gptq"
TENSOR_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
SUPPORTED_BITS = (4, 8)
# default act-order kind: vLLM (gptq, gptq_marlin via g_idx sorting) and GPTQModel load
# desc_act checkpoints with a non-monotone g_idx on their fast paths
ACT_ORDER = "dynamic"
_FORMAT_NAMES = {1: "gptq", 2: "gptq_v2"}


def resolve_version(sym: bool, version: int | None = None) -> int:
    """The zero-storage version actually written: ``version`` if given, else 1 for
    symmetric and 2 for asymmetric layers (see the module docstring)."""
    if version is None:
        return 1 if sym else 2
    if version not in _FORMAT_NAMES:
        raise UserInputError(f"gptq: version={version!r} is not 1 or 2; use --gptq-version 1 or 2")
    return version


def check_options(
    bits: int, group_size: int, sym: bool, act_order: bool, version: int | None = None, **options
) -> str | None:
    """Config-level reason why GPTQ cannot store these options, or ``None``."""
    if bits not in SUPPORTED_BITS:
        return f"bits={bits} is not supported by the gptq writer (4 or 8)"
    if version is not None and version not in _FORMAT_NAMES:
        return f"gptq version={version!r} is not 1 or 2; use --gptq-version 1 or 2"
    if group_size != -1 and group_size <= 0:
        return f"group_size={group_size} is invalid (a positive group size or -1)"
    return None


def check_layer(
    n: int, k: int, bits: int, group_size: int, sym: bool, act_order: bool, **options
) -> str | None:
    """Reason why a ``[n, k]`` layer cannot be stored as GPTQ, or ``None``."""
    per = per_word(bits) if bits in SUPPORTED_BITS else 1
    return (
        check_options(bits, group_size, sym, act_order, **options)
        or not_multiple("k", k, per, f"qweight packs {per} codes per int32 along k")
        or not_multiple("n", n, per, f"qzeros packs {per} zeros per int32 along n")
        or group_size_reason(k, group_size)
    )


def pack(qw: QuantizedWeight, version: int | None = None, **options) -> dict[str, torch.Tensor]:
    """On-disk tensors of one linear (see the module docstring for layouts).

    Raises:
        UnsupportedError: the shape/options do not fit the layout, or ``version=1`` with an
            asymmetric zero of 0 (not representable in v1).
    """
    n, k = qw.shape
    reason = check_layer(
        n, k, qw.bits, qw.group_size, qw.sym, qw.g_idx is not None, version=version
    )
    if reason:
        raise UnsupportedError(f"gptq: {reason}")
    v = resolve_version(qw.sym, version)
    zeros = qw.zeros_or_midpoint().T.to(torch.int64)  # [G, n] logical zeros
    if v == 1:
        bad = int((zeros == 0).sum())
        if bad:
            raise UnsupportedError(
                f"gptq: {bad} asymmetric zero point(s) equal 0, which GPTQ v1 cannot store "
                "(stored field = zero - 1); use --gptq-version 2 (checkpoint_format gptq_v2)"
            )
        zeros = zeros - 1
    g_idx = qw.g_idx if qw.g_idx is not None else contiguous_g_idx(k, qw.group_size)
    return {
        "qweight": pack_words(qw.codes, qw.bits).T.contiguous(),  # [n, k/per] -> [k/per, n]
        "qzeros": pack_words(zeros, qw.bits),  # [G, n/per]
        "scales": qw.scales.T.contiguous(),  # [G, n]
        "g_idx": g_idx.to(torch.int32).contiguous(),  # [k]
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
    version: int | None = None,
    **options,
) -> QuantizedWeight:
    """Exact inverse of :func:`pack`. ``g_idx`` is returned as ``None`` when the stored one
    is the contiguous ``c // group_size``; a missing ``g_idx`` tensor means contiguous.

    Raises:
        FormatError: shapes/dtypes do not match, a v1 zero field is ``2**bits - 1`` (the
            unrepresentable ``z == 0`` corner), or a symmetric layer has non-midpoint zeros.
    """
    n, k, where = out_features, in_features, "gptq unpack"
    v = resolve_version(sym, version)
    per, G = per_word(bits), group_count(k, group_size)
    qweight = expect_shape(tensors, "qweight", (k // per, n), torch.int32, where)
    qzeros = expect_shape(tensors, "qzeros", (G, n // per), torch.int32, where)
    scales = fp16_scales(expect_shape(tensors, "scales", (G, n), "float", where), where)
    g_idx = None
    if "g_idx" in tensors:
        g_idx = expect_shape(tensors, "g_idx", (k,), "int", where).to(torch.int32)
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= G:
            raise FormatError(f"{where}: g_idx values outside 0..{G - 1}")
    codes = unpack_words(qweight.T, bits).contiguous()  # [k/per, n] -> [n, k/per] -> [n, k]
    zeros = unpack_words(qzeros, bits).to(torch.int64)  # [G, n] stored
    if v == 1:
        if bool((zeros == 2**bits - 1).any()):
            raise FormatError(
                f"{where}: v1 qzeros hold field 0x{2**bits - 1:X} (zero {2**bits}): an asymmetric "
                "zero of 0 written by a v1 packer that cannot represent it; this layer's zeros are "
                "ambiguous (re-export it as gptq_v2)"
            )
        zeros = zeros + 1
    zeros = zeros.T.to(torch.uint8).contiguous()  # [n, G]
    if sym:
        if bool((zeros != 2 ** (bits - 1)).any()):
            raise FormatError(
                f"{where}: config says sym but qzeros are not the midpoint {2 ** (bits - 1)}"
            )
        zeros = None
    return QuantizedWeight(
        codes=codes,
        scales=scales.T.contiguous(),  # [n, G]
        zeros=zeros,
        g_idx=canonical_g_idx(g_idx, group_size),
        bits=bits,
        group_size=group_size,
        sym=sym,
        bias=read_bias(tensors, n, where),
    )


# vLLM fuses these siblings into one linear, named as the key, and looks a fused layer's
# ``dynamic`` override up by that name: a per-layer pattern that covers all of them also
# names the fused layer
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def quantization_config(
    bits: int, group_size: int, sym: bool, act_order: bool, version: int | None = None,
    layers: dict[str, int] | None = None, **options
) -> dict:
    """``config.json -> quantization_config`` as GPTQModel writes it (spec §3.5), read by
    vLLM (``gptq`` / ``gptq_marlin``) and transformers ``GPTQConfig``. ``desc_act`` is
    false for ``group_size == -1`` (one group: act-order has no layout effect; vLLM forces it).

    ``layers`` (per-layer widths, ``--bits-budget``): ``{module name on disk: bits}`` of
    the linears not at ``bits``, written as GPTQModel's ``dynamic`` overrides (read by
    GPTQModel and vLLM: the first key whose regex ``re.match``-es the module name, ``+:``
    positive): one anchored pattern per parent module and width, e.g.
    ``+:^model\\.layers\\.3\\.self_attn\\.(?:k_proj|q_proj|qkv_proj|v_proj)$`` -> ``{"bits": 8}``."""
    fmt = _FORMAT_NAMES[resolve_version(sym, version)]
    out = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": bool(act_order and group_size != -1),
        "sym": sym,
        "lm_head": False,
        "checkpoint_format": fmt,
        "format": fmt,
        "pack_dtype": "int32",
    }
    if layers and any(b != bits for b in layers.values()):
        out["dynamic"] = _dynamic({n: b for n, b in layers.items() if b != bits})
    return out


def _dynamic(layers: dict[str, int]) -> dict[str, dict]:
    by_parent: dict[tuple[str, int], set[str]] = {}
    for name, width in layers.items():
        if width not in SUPPORTED_BITS:
            raise UnsupportedError(f"gptq: {width}-bit layers are not supported (4 or 8)")
        parent, _, leaf = name.rpartition(".")
        by_parent.setdefault((parent, width), set()).add(leaf)
    out = {}
    for (parent, width), leaves in sorted(by_parent.items()):
        names = leaves | {fused for fused, members in _FUSED.items() if set(members) <= leaves}
        alternatives = "|".join(re.escape(n) for n in sorted(names))
        out[f"+:^{re.escape(parent)}\\.(?:{alternatives})$"] = {"bits": width}
    return out


def options_from_config(cfg: dict) -> dict:
    """``{bits, group_size, sym, act_order, version}`` from a GPTQ ``quantization_config``
    (GPTQModel or AutoGPTQ keys; ``format`` or legacy ``checkpoint_format``). GPTQModel's
    ``dynamic`` overrides become ``layers``: ``[("regex", pattern, overrides)]`` in the
    config's order (first match wins, as GPTQModel and vLLM read them); ``-:`` (skip)
    patterns need no entry (such layers are stored in float)."""
    if cfg.get("quant_method", "gptq") != "gptq":
        raise FormatError(f"gptq: quant_method {cfg.get('quant_method')!r} is not 'gptq'")
    fmt = cfg.get("format") or cfg.get("checkpoint_format") or "gptq"
    versions = {name: v for v, name in _FORMAT_NAMES.items()}
    if fmt not in versions:
        raise FormatError(f"gptq: checkpoint format {fmt!r} is not 'gptq' or 'gptq_v2'")
    out = {
        "bits": int(cfg["bits"]),
        "group_size": int(cfg["group_size"]),
        "sym": bool(cfg.get("sym", True)),
        "act_order": bool(cfg.get("desc_act", False)),
        "version": versions[fmt],
    }
    layers = []
    for key, override in (cfg.get("dynamic") or {}).items():
        if key.startswith("-:"):
            continue
        unknown = set(override) - {"bits", "group_size", "sym", "desc_act"}
        if unknown:
            raise UnsupportedError(f"gptq: dynamic override {key!r} sets {sorted(unknown)}; qtool reads bits, "
                                   "group_size, sym and desc_act")
        layers.append(("regex", key.removeprefix("+:"),
                       {k: (int(v) if k in ("bits", "group_size") else bool(v)) for k, v in override.items()
                        if k != "desc_act"}))
    if layers:
        out["layers"] = layers
    return out


def layer_shape(tensors: dict[str, torch.Tensor], *, bits: int, **options) -> tuple[int, int]:
    """``(out_features, in_features)`` of a stored layer: ``qweight`` is ``[k * bits / 32, n]``."""
    rows, n = tensors["qweight"].shape
    return n, rows * 32 // bits
