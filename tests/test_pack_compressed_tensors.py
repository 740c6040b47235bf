"""Our compressed-tensors ``pack-quantized`` writer against the compressed-tensors package
itself (skipped when it is not installed): its packing helpers, its compressor (quantize +
pack from the float weight), its decompressor, and its config parser."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from pack_helpers import make_qw

from qtool.errors import UnsupportedError
from qtool.pack import compressed_tensors as ct

ctq = pytest.importorskip(
    "compressed_tensors.quantization", reason="compressed-tensors not installed"
)


def _helpers():
    """``(pack_to_int32, unpack_from_int32)`` from wherever this release keeps them."""
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import (
            pack_to_int32,
            unpack_from_int32,
        )
    except ImportError:
        from compressed_tensors.compressors.quantized_compressors.pack_quantized import (
            pack_to_int32,
            unpack_from_int32,
        )
    return pack_to_int32, unpack_from_int32


def _signed(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Our unsigned codes/zeros as compressed-tensors' signed int8 (``c - 2**(bits-1)``)."""
    return (values.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)


CASES = [(4, 128, True), (4, 64, False), (4, -1, False), (8, 32, False), (8, -1, True)]


@pytest.mark.parametrize("bits,g,sym", CASES)
def test_fields_match_pack_to_int32(bits, g, sym):
    pack_to_int32, unpack_from_int32 = _helpers()
    qw = make_qw(128, 256, bits=bits, group_size=g, sym=sym, probe=False, seed=21)
    ours = ct.pack(qw)
    assert torch.equal(ours["weight_packed"], pack_to_int32(_signed(qw.codes, bits), bits))
    assert torch.equal(
        unpack_from_int32(ours["weight_packed"], bits, torch.Size([128, 256])),
        _signed(qw.codes, bits),
    )
    if not sym:
        theirs = pack_to_int32(_signed(qw.zeros, bits), bits, packed_dim=0)
        assert torch.equal(ours["weight_zero_point"], theirs)


@pytest.mark.parametrize("bits,g,sym", CASES)
def test_compressor_agrees_both_ways(bits, g, sym):
    base = pytest.importorskip("compressed_tensors.compressors.pack_quantized.base")
    qw = make_qw(128, 256, bits=bits, group_size=g, sym=sym, probe=False, seed=22)
    args = ctq.QuantizationArgs(
        num_bits=bits,
        symmetric=sym,
        strategy="channel" if g == -1 else "group",
        group_size=None if g == -1 else g,
    )
    scheme = ctq.QuantizationScheme(targets=["Linear"], weights=args)
    state = {
        "weight": qw.dequantize(torch.float32),  # exact (code - zero) * scale
        "weight_scale": qw.scales,
        "weight_zero_point": _signed(qw.zeros_or_midpoint(), bits),
    }
    theirs = base.PackedQuantizationCompressor.compress(state, scheme)
    ours = ct.pack(qw)
    assert sorted(theirs) == sorted(ours)
    for key in ours:
        assert torch.equal(theirs[key], ours[key]), key
    restored = base.PackedQuantizationCompressor.decompress(ours, scheme)
    assert torch.equal(restored["weight"], qw.dequantize(torch.float16))


@pytest.mark.parametrize("actorder", [None, "weight"])
@pytest.mark.parametrize("bits,g,sym", CASES)
def test_config_parses(bits, g, sym, actorder):
    cfg = ct.quantization_config(bits, g, sym, act_order=False, actorder=actorder)
    parsed = ctq.QuantizationConfig.model_validate(cfg)
    assert parsed.format == "pack-quantized"
    weights = parsed.config_groups["group_0"].weights
    assert (weights.num_bits, weights.symmetric) == (bits, sym)
    assert weights.strategy == ("channel" if g == -1 else "group")
    assert weights.group_size == (None if g == -1 else g)
    assert weights.actorder == actorder
    assert parsed.ignore == ["lm_head"]


def test_dynamic_act_order_is_refused_not_written():
    """compressed-tensors' parser rejects the config dynamic act-order needs (``actorder
    "group"``), so qtool refuses such options and layers instead of writing them."""
    cfg = ct.quantization_config(4, 64, True, act_order=False)
    cfg["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    with pytest.raises(ValueError, match="removed"):
        ctq.QuantizationConfig.model_validate(cfg)
    assert "dynamic act-order" in ct.check_options(4, 64, True, act_order=True)
    assert ct.check_options(4, -1, True, act_order=True) is None  # one group: no g_idx
    with pytest.raises(UnsupportedError, match="dynamic act-order"):
        ct.quantization_config(4, 64, True, act_order=True)
    with pytest.raises(UnsupportedError, match="dynamic act-order"):
        ct.pack(make_qw(128, 256, group_size=64, sym=True, act_order=True, seed=23))
    contiguous = make_qw(128, 256, group_size=64, sym=True, seed=23)
    packed = ct.pack(replace(contiguous, g_idx=(torch.arange(256) // 64).to(torch.int32)))  # trivial g_idx
    plain = ct.pack(contiguous)
    assert sorted(packed) == sorted(plain) and "weight_g_idx" not in packed
    assert all(torch.equal(packed[key], plain[key]) for key in plain)
