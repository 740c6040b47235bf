"""Marlin tile layout (IST-DASLab/marlin; vLLM ``marlin`` / ``gptq_marlin`` / ``awq_marlin``
kernels), 4-bit only. Spec: ``shared/refvectors/README.md`` §2.

Tensors of one quantized linear:

====== ======== ============== ==========================================================
suffix dtype    shape          content
====== ======== ============== ==========================================================
B      int32    [k/16, 2n]     codes ``Q[k, n]`` (rows in kernel order, see ``perm``) in
                               16x16 tiles, each 1024-entry chunk gathered with
                               :func:`weight_perm`, 8 nibbles per word (§2.2)
s      float16  [G, n]         scales, columns permuted: "grouped" 8x8 transpose per 64
                               columns when ``G > 1``, "single" rule per 32 columns when
                               ``G == 1`` (also ``group_size == k``) (§2.3)
zp     int32    [G, n/8]       only asymmetric (vLLM ``uint4`` + zero point): logical
                               zeros, grouped 64-column permutation (always, even for
                               G = 1), then ``ORDER`` within 8, packed along n (§2.5)
g_idx  int32    [k]            only act-order: the group ids sorted ascending
perm   int32    [k]            only act-order: ``stable argsort(g_idx)``; row ``x`` of ``Q``
                               is input channel ``perm[x]`` (vLLM ``g_idx_sort_indices``)
bias   float16  [n]            only when the layer has a bias
====== ======== ============== ==========================================================

Symmetric layers use vLLM's ``uint4b8`` (value = code - 8), so ``B`` holds the canonical
codes unchanged; asymmetric layers hold raw codes and ``zp``.

``quantization_config``: a symmetric layer without act-order is the legacy serialized Marlin
checkpoint (``B``, ``s``, ``bias`` only), written with the AutoGPTQ keys that make vLLM pick
its ``marlin`` method (§2.8): ``quant_method "gptq"``, ``checkpoint_format "marlin"``; vLLM
accepts it only for ``group_size`` 128 or -1, so :func:`check_options` refuses other groups
for that variant. No consumer reads the zero-point or act-order variants from disk (vLLM's
``marlin`` method reads only ``group_size`` and would silently ignore ``zp``/``g_idx``), so
they are written with ``quant_method "qtool_marlin"``: an unknown method makes vLLM and
transformers refuse the checkpoint instead of computing wrong outputs; qtool reads it back.

Limits: :func:`pack` enforces only the layout's own (4-bit, ``k % 16``, ``n % 64``, whole
groups), so it can also produce the load-time layout vLLM builds from GPTQ/AWQ checkpoints.
:func:`check_options` / :func:`check_layer` (run before calibration) add the consumers'
limits (§2.7), because a Marlin checkpoint is only useful to a Marlin kernel: ``k % 128``,
groups -1/32/64/128, and -1/128 only for the legacy symmetric checkpoint.
"""

from __future__ import annotations

import torch

from qtool.errors import FormatError, UnsupportedError
from qtool.pack._bits import (
    bias_tensors,
    expect_shape,
    fp16_scales,
    group_count,
    group_size_reason,
    not_multiple,
    pack_words,
    read_bias,
    unpack_words,
)
from qtool.qtensor import QuantizedWeight

NAME = "marlin"
TENSOR_SUFFIXES = ("B", "s", "zp", "g_idx", "perm")
KERNEL_GROUP_SIZES = (-1, 32, 64, 128)  # vLLM gptq_marlin / awq_marlin
LEGACY_GROUP_SIZES = (-1, 128)  # vLLM legacy `marlin` method (serialized B/s checkpoints)
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # zero-point nibble order inside 8 columns
_LEGACY_METHOD, _VARIANT_METHOD = "gptq", "qtool_marlin"
# default act-order kind: no client reads a serialized Marlin checkpoint today (vLLM removed
# its `marlin` loader), so quality decides: dynamic, as for gptq
ACT_ORDER = "dynamic"


def weight_perm() -> torch.Tensor:
    """int64 ``[1024]``: the gather applied to every 1024-entry chunk of a tiled row (§2.2).

    Word ``u = 4i + j`` of a chunk (thread ``i`` 0..31, tile ``j`` 0..3) holds, in nibble
    ``p``, the element at row ``a`` and column ``b`` of tile ``j`` with ``t = i % 4``,
    ``col = i // 4``: ``a = 2t + (0, 8, 0, 8, 1, 9, 1, 9)[p]``,
    ``b = col + (0, 0, 8, 8, 0, 0, 8, 8)[p]`` (the m16n8k16 MMA fragment order with the
    ``0,2,4,6,1,3,5,7`` nibble interleave)."""
    a_off = torch.tensor([0, 8, 0, 8, 1, 9, 1, 9])
    b_off = torch.tensor([0, 0, 8, 8, 0, 0, 8, 8])
    i = torch.arange(32).view(32, 1, 1)  # thread
    j = torch.arange(4).view(1, 4, 1)  # tile within the chunk
    a = 2 * (i % 4) + a_off  # [32, 1, 8]
    b = i // 4 + b_off  # [32, 1, 8]
    return (256 * j + 16 * a + b).reshape(1024)  # [32, 4, 8] -> word u = 4i + j, nibble p


def scale_perm() -> torch.Tensor:
    """int64 ``[64]``: grouped rule, ``s[8i + j] = S[i + 8j]`` within 64 columns."""
    return torch.arange(64).view(8, 8).T.reshape(64)


def scale_perm_single() -> torch.Tensor:
    """int64 ``[32]``: single-group rule, ``s[8i + m] = S[2i + (0,1,8,9,16,17,24,25)[m]]``."""
    off = torch.tensor([0, 1, 8, 9, 16, 17, 24, 25])
    return (2 * torch.arange(4).view(4, 1) + off).reshape(32)


def check_options(bits: int, group_size: int, sym: bool, act_order: bool, **options) -> str | None:
    """Config-level reason why Marlin cannot store these options, or ``None``."""
    if bits != 4:
        return f"bits={bits}: the Marlin writer is 4-bit only (vLLM repacks 8-bit GPTQ to Marlin at load time)"
    if group_size not in KERNEL_GROUP_SIZES:
        return f"group_size={group_size} is not one the Marlin kernels accept {KERNEL_GROUP_SIZES}"
    if sym and not act_order and group_size not in LEGACY_GROUP_SIZES:
        return (
            f"group_size={group_size}: symmetric weights without act-order are vLLM's serialized-Marlin "
            f"checkpoint, whose loader accepts only group sizes {LEGACY_GROUP_SIZES}"
        )
    return None


def check_layer(
    n: int, k: int, bits: int, group_size: int, sym: bool, act_order: bool, **options
) -> str | None:
    """Reason why a ``[n, k]`` layer cannot be stored as Marlin, or ``None``: the layout
    limits plus the kernel limits (spec §2.7)."""
    return (
        check_options(bits, group_size, sym, act_order, **options)
        or _layout_reason(n, k, bits, group_size)
        or not_multiple("k", k, 128, "the Marlin kernel limit")
    )


def _layout_reason(n: int, k: int, bits: int, group_size: int) -> str | None:
    """What the tensors themselves need (bits 4, ``k % 16``, ``n % 64``, whole groups);
    the kernels' and loaders' stricter limits live in :func:`check_layer`."""
    if bits != 4:
        return f"bits={bits}: the Marlin writer is 4-bit only"
    return (
        not_multiple("k", k, 16, "Marlin 16x16 tiles")
        or not_multiple("n", n, 64, "Marlin 16x64 tiles")
        or group_size_reason(k, group_size)
    )


def _tile(q: torch.Tensor) -> torch.Tensor:
    """Codes ``Q`` uint8 ``[k, n]`` -> ``B`` int32 ``[k/16, 2n]``."""
    k, n = q.shape
    t = q.reshape(k // 16, 16, n // 16, 16).permute(0, 2, 1, 3)  # [k/16, n/16, a, b]
    chunks = t.reshape(k // 16, n // 64, 1024)[:, :, weight_perm()]  # [k/16, n/64, 1024]
    return pack_words(chunks.reshape(k // 16, 16 * n), 4)  # [k/16, 2n]


def _untile(b: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Inverse of :func:`_tile`: ``B`` int32 ``[k/16, 2n]`` -> uint8 ``[k, n]``."""
    chunks = unpack_words(b, 4).reshape(k // 16, n // 64, 1024)  # [k/16, n/64, 1024] permuted
    t = chunks[:, :, torch.argsort(weight_perm())]  # [k/16, n/64, 1024] tile order
    t = t.reshape(k // 16, n // 16, 16, 16).permute(0, 2, 1, 3)  # [k/16, a, n/16, b]
    return t.reshape(k, n).contiguous()


def _column_perm(n: int, block: torch.Tensor) -> torch.Tensor:
    """int64 ``[n]``: ``block`` (a permutation of ``0..m-1``) applied to every ``m`` columns."""
    m = block.numel()
    return (torch.arange(n // m).view(-1, 1) * m + block).reshape(n)


def _scale_columns(n: int, num_groups: int) -> torch.Tensor:
    """The column gather of ``s`` (§2.3): grouped when ``G > 1``, else single."""
    return _column_perm(n, scale_perm() if num_groups > 1 else scale_perm_single())


def _zp_columns(n: int) -> torch.Tensor:
    """The column gather of the zero points before packing (§2.5): grouped, then ``ORDER``."""
    grouped = _column_perm(n, scale_perm())  # [n]
    return grouped[_column_perm(n, torch.tensor(ORDER))]  # Z2[8w+p] = Z1[8w+ORDER[p]]


def pack(qw: QuantizedWeight, **options) -> dict[str, torch.Tensor]:
    """On-disk tensors of one linear (see the module docstring for names and layouts).

    Raises:
        UnsupportedError: a layer outside the layout (bits 4, ``k % 16``, ``n % 64``, whole
            groups); the kernels' stricter limits are :func:`check_layer`'s job.
    """
    n, k = qw.shape
    act_order = qw.g_idx is not None
    reason = _layout_reason(n, k, qw.bits, qw.group_size)
    if reason:
        raise UnsupportedError(f"marlin: {reason}")
    q = qw.codes.T  # [k, n], original input order
    out = {}
    if act_order:
        perm = torch.argsort(qw.g_idx, stable=True)  # [k]
        q = q[perm]  # [k, n], rows sorted by group id
        out["g_idx"] = qw.g_idx[perm].contiguous()
        out["perm"] = perm.to(torch.int32)
    out["B"] = _tile(q.contiguous())
    out["s"] = qw.scales.T[:, _scale_columns(n, qw.num_groups)].contiguous()  # [G, n]
    if not qw.sym:
        out["zp"] = pack_words(qw.zeros.T[:, _zp_columns(n)], 4)  # [G, n] -> [G, n/8]
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
    """Exact inverse of :func:`pack`: codes and ``g_idx`` come back in the original input
    order (act-order is recognised by the presence of ``perm``).

    Raises:
        FormatError: options outside the layout or tensors of the wrong shape/dtype.
    """
    n, k, where = out_features, in_features, "marlin unpack"
    reason = _layout_reason(n, k, bits, group_size)
    if reason:
        raise FormatError(f"{where}: {reason}")
    G = group_count(k, group_size)
    q = _untile(expect_shape(tensors, "B", (k // 16, 2 * n), torch.int32, where), k, n)  # [k, n]
    s = fp16_scales(expect_shape(tensors, "s", (G, n), "float", where), where)
    scales = torch.empty_like(s)
    scales[:, _scale_columns(n, G)] = s  # [G, n] logical
    zeros = None
    if not sym:
        zp = unpack_words(expect_shape(tensors, "zp", (G, n // 8), torch.int32, where), 4)
        zeros = torch.empty_like(zp)
        zeros[:, _zp_columns(n)] = zp  # [G, n] logical
        zeros = zeros.T.contiguous()  # [n, G]
    g_idx = None
    if ("perm" in tensors) != ("g_idx" in tensors):
        raise FormatError(
            f"{where}: act-order needs both 'perm' and 'g_idx' (have {sorted(tensors)})"
        )
    if "perm" in tensors:
        perm = expect_shape(tensors, "perm", (k,), torch.int32, where).long()
        sorted_g_idx = expect_shape(tensors, "g_idx", (k,), torch.int32, where)
        if not torch.equal(torch.sort(perm).values, torch.arange(k)):
            raise FormatError(f"{where}: 'perm' is not a permutation of 0..{k - 1}")
        if bool((sorted_g_idx[1:] < sorted_g_idx[:-1]).any()) or int(sorted_g_idx.max()) >= G:
            raise FormatError(f"{where}: 'g_idx' is not sorted group ids in 0..{G - 1}")
        codes_kn = torch.empty_like(q)
        codes_kn[perm] = q  # row x of Q is input channel perm[x]
        q = codes_kn
        g_idx = torch.empty_like(sorted_g_idx)
        g_idx[perm] = sorted_g_idx
    return QuantizedWeight(
        codes=q.T.contiguous(),  # [n, k]
        scales=scales.T.contiguous(),  # [n, G]
        zeros=zeros,
        g_idx=g_idx,
        bits=4,
        group_size=group_size,
        sym=sym,
        bias=read_bias(tensors, n, where),
    )


def quantization_config(bits: int, group_size: int, sym: bool, act_order: bool, **options) -> dict:
    """Legacy serialized-Marlin config for symmetric layers without act-order (vLLM picks its
    ``marlin`` method from ``checkpoint_format``); a ``qtool_marlin`` config for the
    zero-point / act-order variants (see the module docstring)."""
    act_order = bool(act_order and group_size != -1)
    if sym and not act_order:
        return {
            "quant_method": _LEGACY_METHOD,
            "checkpoint_format": "marlin",
            "bits": bits,
            "group_size": group_size,
            "desc_act": False,
            "sym": True,
            "lm_head": False,
        }
    return {
        "quant_method": _VARIANT_METHOD,
        "checkpoint_format": "marlin",
        "bits": bits,
        "group_size": group_size,
        "desc_act": act_order,
        "sym": sym,
        "zero_point": not sym,
        "weight_type": "uint4b8" if sym else "uint4",
    }


def options_from_config(cfg: dict) -> dict:
    """``{bits, group_size, sym, act_order}`` from a Marlin ``quantization_config``: qtool's
    own, AutoGPTQ's (``checkpoint_format "marlin"`` or ``is_marlin_format``) or the hub's
    ``quant_method "marlin"``; the legacy forms are always symmetric without act-order."""
    method = cfg.get("quant_method")
    if method == _VARIANT_METHOD:
        return {
            "bits": int(cfg["bits"]),
            "group_size": int(cfg["group_size"]),
            "sym": bool(cfg["sym"]),
            "act_order": bool(cfg["desc_act"]),
        }
    legacy = method == "marlin" or (
        method == _LEGACY_METHOD
        and (cfg.get("checkpoint_format") == "marlin" or bool(cfg.get("is_marlin_format")))
    )
    if not legacy:
        raise FormatError(
            f"marlin: quantization_config does not describe a Marlin checkpoint: {cfg}"
        )
    return {
        "bits": int(cfg.get("bits", 4)),
        "group_size": int(cfg["group_size"]),
        "sym": True,
        "act_order": False,
    }


def layer_shape(tensors: dict[str, torch.Tensor], **options) -> tuple[int, int]:
    """``(out_features, in_features)`` of a stored layer: ``B`` is ``[k / 16, 2 n]``."""
    rows, cols = tensors["B"].shape
    return cols // 2, rows * 16
