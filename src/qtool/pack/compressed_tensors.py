"""compressed-tensors ``pack-quantized`` layout (llm-compressor; read by vLLM
``compressed-tensors`` WNA16 and transformers ``CompressedTensorsConfig``), int 4/8-bit.

Tensors of one quantized linear (``per = 32 // bits``):

================== ======== ============== ==============================================
suffix             dtype    shape          content
================== ======== ============== ==============================================
weight_packed      int32    [n, k/per]     codes packed along k per output row: field i
                                           of ``weight_packed[j, w]`` = ``codes[j, per*w + i]``
weight_scale       float16  [n, G]         scales, row = output channel
weight_zero_point  int32    [n/per, G]     only asymmetric: logical zeros packed along
                                           **n** (dim 0): field i of ``[r, g]`` = zero of
                                           output ``per*r + i``, group g
weight_shape       int64    [2]            ``[n, k]``
weight_g_idx       int32    [k]            read only (older ``actorder: "group"``
                                           checkpoints); never written
bias               float16  [n]            only when the layer has a bias
================== ======== ============== ==============================================

Value convention (verified in compressed-tensors 0.20.0 ``compressors/pack_quantized``
``pack_to_int32`` / ``unpack_from_int32`` and its ``forward.dequantize``, and in the older
``compressors/quantized_compressors/pack_quantized.py``; vLLM's WNA16 scheme registers
``weight_zero_point`` as ``[n // pack_factor, G]`` packed on the output dim):
compressed-tensors quantizes to *signed* ints ``q`` in ``-2**(bits-1) .. 2**(bits-1)-1``
with signed zero points ``zp`` and dequantizes ``(q - zp) * scale``; both are stored
offset by ``2**(bits-1)``. Our unsigned code ``c = q + 8`` and logical zero ``z = zp + 8``
(4-bit) therefore land in the fields unchanged: ``weight_packed`` fields are our codes,
``weight_zero_point`` fields are our zeros, and ``(c - z) * s == (q - zp) * s``.
Symmetric layers store no zero point (implicit ``zp = 0``, i.e. ``z = 8``).

Act-order: compressed-tensors 0.20 removed dynamic act-order (``actorder: "group"`` with a
non-monotone ``weight_g_idx``): its config parser raises on it, its decompressor has no
``g_idx`` and vLLM's WNA16 scheme parses the config with that same class. Only static
act-order remains (``actorder: "weight"``: columns solved in act-order, groups fixed
beforehand, no ``g_idx``), so GPTQ writes this format with static groups by default
(``ACT_ORDER``) and a layer with a non-contiguous ``g_idx`` is refused before any work
(:func:`check_options`), never written. ``actorder: "weight"`` is recorded when the
``actorder`` option says so (``qtool quantize`` passes it for static act-order).
"""

from __future__ import annotations

import torch

from qtool.errors import FormatError, UnsupportedError
from qtool.pack._bits import (
    bias_tensors,
    canonical_g_idx,
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

NAME = "compressed-tensors"
TENSOR_SUFFIXES = (
    "weight_packed",
    "weight_scale",
    "weight_zero_point",
    "weight_shape",
    "weight_g_idx",
)
SUPPORTED_BITS = (4, 8)
# default act-order kind: compressed-tensors >= 0.20 (and vLLM through it) accepts only
# static act-order, actorder "weight"
ACT_ORDER = "static"
ACTORDERS = (None, "weight")  # the ``actorder`` values this writer records


def check_options(bits: int, group_size: int, sym: bool, act_order: bool, **options) -> str | None:
    """Config-level reason why pack-quantized cannot store these options, or ``None``."""
    if bits not in SUPPORTED_BITS:
        return f"bits={bits} is not supported by the compressed-tensors writer (4 or 8)"
    if group_size != -1 and group_size <= 0:
        return f"group_size={group_size} is invalid (a positive group size or -1, per channel)"
    if act_order and group_size != -1:
        return ("dynamic act-order (a non-monotone g_idx, actorder 'group'): compressed-tensors 0.20 removed it "
                "and refuses such a config; it reads static act-order (actorder 'weight') only")
    if options.get("actorder") not in ACTORDERS:
        return f"actorder={options.get('actorder')!r} is not one of {ACTORDERS}"
    return None


def check_layer(
    n: int, k: int, bits: int, group_size: int, sym: bool, act_order: bool, **options
) -> str | None:
    """Reason why a ``[n, k]`` layer cannot be stored as pack-quantized, or ``None``."""
    per = per_word(bits) if bits in SUPPORTED_BITS else 1
    return (
        check_options(bits, group_size, sym, act_order, **options)
        or not_multiple("k", k, per, f"weight_packed holds {per} codes per int32")
        or (None if sym else not_multiple("n", n, per, f"weight_zero_point packs {per} zeros per int32 along n"))
        or group_size_reason(k, group_size)
    )


def pack(qw: QuantizedWeight, **options) -> dict[str, torch.Tensor]:
    """On-disk tensors of one linear (see the module docstring for layouts).

    Raises:
        UnsupportedError: shape or options outside the format (see :func:`check_layer`).
    """
    n, k = qw.shape
    reason = check_layer(n, k, qw.bits, qw.group_size, qw.sym, canonical_g_idx(qw.g_idx, qw.group_size) is not None)
    if reason:
        raise UnsupportedError(f"compressed-tensors: {reason}")
    out = {
        "weight_packed": pack_words(qw.codes, qw.bits),  # [n, k/per]
        "weight_scale": qw.scales.contiguous(),  # [n, G]
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if not qw.sym:
        out["weight_zero_point"] = pack_words(qw.zeros.T, qw.bits).T.contiguous()  # [n/per, G]
    out.update(bias_tensors(qw.bias))
    return out


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
        FormatError: tensors of the wrong shape/dtype, or ``weight_shape`` disagreeing with
            ``(out_features, in_features)``.
    """
    n, k, where = out_features, in_features, "compressed-tensors unpack"
    reason = check_layer(n, k, bits, group_size, sym, False)
    if reason:
        raise FormatError(f"{where}: {reason}")
    per, G = per_word(bits), group_count(k, group_size)
    if "weight_shape" in tensors and tensors["weight_shape"].tolist() != [n, k]:
        raise FormatError(f"{where}: weight_shape {tensors['weight_shape'].tolist()} != [{n}, {k}]")
    packed = expect_shape(tensors, "weight_packed", (n, k // per), torch.int32, where)
    scales = fp16_scales(expect_shape(tensors, "weight_scale", (n, G), "float", where), where)
    zeros = None
    if not sym:
        zp = expect_shape(tensors, "weight_zero_point", (n // per, G), torch.int32, where)
        zeros = unpack_words(zp.T, bits).T.contiguous()  # [G, n/per] -> [G, n] -> [n, G]
    g_idx = None
    if "weight_g_idx" in tensors:
        g_idx = expect_shape(tensors, "weight_g_idx", (k,), "int", where).to(torch.int32)
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= G:
            raise FormatError(f"{where}: weight_g_idx values outside 0..{G - 1}")
    return QuantizedWeight(
        codes=unpack_words(packed, bits),  # [n, k]
        scales=scales.contiguous(),
        zeros=zeros,
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
        sym=sym,
        bias=read_bias(tensors, n, where),
    )


def quantization_config(
    bits: int, group_size: int, sym: bool, act_order: bool, actorder: str | None = None,
    layers: dict[str, int] | None = None, **options
) -> dict:
    """compressed-tensors' own ``quantization_config``: one config group targets ``Linear``
    (``lm_head`` ignored), ``strategy "group"`` or ``"channel"`` (group -1),
    status ``compressed``, ``actorder`` = the ``actorder`` option (``None`` or ``"weight"``).

    ``layers`` (per-layer widths, ``--bits-budget``): ``{module name on disk: bits}`` of
    the linears not at ``bits``; each other width gets its own group, before the
    ``Linear`` one, whose targets are those exact names (compressed-tensors and vLLM match
    an exact name before a class name, so these layers take their group's scheme).
    transformers 5.25's ``CompressedTensorsConfig(dequantize=True)`` decompresses every
    dense layer with one group's scheme, so it misreads such checkpoints; its default
    loading applies each module's scheme (``tests/test_bits_budget.py``).

    Raises:
        UnsupportedError: dynamic act-order (``act_order`` with groups), which
            compressed-tensors >= 0.20 refuses (see :func:`check_options`).
    """
    reason = check_options(bits, group_size, sym, act_order, actorder=actorder)
    if reason:
        raise UnsupportedError(f"compressed-tensors: {reason}")

    def scheme(width: int, targets: list[str]) -> dict:
        return {
            "targets": targets,
            "weights": {
                "num_bits": width,
                "type": "int",
                "symmetric": sym,
                "strategy": "channel" if group_size == -1 else "group",
                "group_size": None if group_size == -1 else group_size,
                "block_structure": None,
                "dynamic": False,
                "actorder": actorder,
                "observer": "minmax",
                "observer_kwargs": {},
            },
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }

    groups = {}
    for width in sorted(set((layers or {}).values()) - {bits}):
        if width not in SUPPORTED_BITS:
            raise UnsupportedError(f"compressed-tensors: {width}-bit layers are not supported (4 or 8)")
        groups[f"group_{len(groups)}"] = scheme(width, sorted(n for n, b in layers.items() if b == width))
    groups[f"group_{len(groups)}"] = scheme(bits, ["Linear"])  # last: compressed-tensors' matcher warns about
    # a named target that a module met only after matching an earlier group's "Linear"
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def options_from_config(cfg: dict) -> dict:
    """``{bits, group_size, sym, act_order}`` from a compressed-tensors config of
    pack-quantized int weight schemes (the form :func:`quantization_config` writes and
    llm-compressor's W4A16/W8A16 presets produce). With several config groups, the one
    that targets ``Linear`` (else the first) gives these, and the others' targets become
    ``layers``: ``[(kind, pattern, {bits, group_size, sym})]`` with exact module names
    first, then ``re:`` patterns in sorted order (compressed-tensors' own precedence);
    ``qtool.pack.layer_params`` applies them."""
    where = "compressed-tensors config"
    if cfg.get("quant_method") != "compressed-tensors":
        raise FormatError(
            f"{where}: quant_method {cfg.get('quant_method')!r} is not 'compressed-tensors'"
        )
    groups = cfg.get("config_groups") or {}
    if not groups:
        raise UnsupportedError(f"{where}: no config groups")
    params = {name: _scheme_params(scheme, cfg, f"{where} {name}") for name, scheme in groups.items()}
    base = next((name for name, scheme in groups.items() if "Linear" in scheme.get("targets", ())), next(iter(groups)))
    exact, regex = [], []
    for name, scheme in groups.items():
        if name == base:
            continue
        over = {k: params[name][k] for k in ("bits", "group_size", "sym")}
        for target in scheme.get("targets", ()):
            if target.startswith("re:"):
                regex.append(("regex", target[3:], over))
            elif "." in target:
                exact.append(("exact", target, over))
            else:  # a class name other than the default group's
                raise UnsupportedError(f"{where} {name}: target {target!r} (a module class) in a second config "
                                       "group; qtool reads per-layer groups by module name")
    out = {**params[base]}
    if exact or regex:
        out["layers"] = [*exact, *sorted(regex, key=lambda e: e[1])]
    return out


def _scheme_params(scheme: dict, cfg: dict, where: str) -> dict:
    fmt = scheme.get("format") or cfg.get("format")
    if fmt != "pack-quantized":
        raise UnsupportedError(f"{where}: format {fmt!r} is not 'pack-quantized'")
    weights = scheme.get("weights") or {}
    if weights.get("type", "int") != "int" or scheme.get("input_activations") is not None:
        raise UnsupportedError(f"{where}: only int weight-only schemes are supported")
    strategy = weights.get("strategy")
    if strategy not in ("group", "channel"):
        raise UnsupportedError(f"{where}: strategy {strategy!r} is not 'group' or 'channel'")
    return {
        "bits": int(weights["num_bits"]),
        "group_size": -1 if strategy == "channel" else int(weights["group_size"]),
        "sym": bool(weights.get("symmetric", True)),
        "act_order": weights.get("actorder") in ("group", "dynamic"),
    }


def layer_shape(tensors: dict[str, torch.Tensor], **options) -> tuple[int, int]:
    """``(out_features, in_features)`` from the stored ``weight_shape``."""
    n, k = (int(v) for v in tensors["weight_shape"].tolist())
    return n, k
