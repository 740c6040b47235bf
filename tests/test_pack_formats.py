"""The format registry, the shared module API, the pre-calibration checks and the
``quantization_config`` each format writes (and reads back)."""

from __future__ import annotations

import itertools

import pytest
import torch
from pack_helpers import make_qw, unpack_like

from qtool.errors import FormatError, UnsupportedError, UserInputError
from qtool.pack import FORMATS, awq, get_format, gptq, marlin

API = (
    "check_options",
    "check_layer",
    "pack",
    "unpack",
    "quantization_config",
    "options_from_config",
)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_module_api(name):
    fmt = get_format(name)
    assert fmt.NAME == name
    assert all(callable(getattr(fmt, attr)) for attr in API)
    assert isinstance(fmt.TENSOR_SUFFIXES, tuple) and fmt.TENSOR_SUFFIXES
    assert "bias" not in fmt.TENSOR_SUFFIXES


def test_unknown_format_lists_the_supported_ones():
    with pytest.raises(UserInputError) as e:
        get_format("exl2")
    for name in FORMATS:
        assert name in str(e.value)


OPTION_GRID = list(itertools.product((4, 8), (-1, 32, 64, 128), (True, False), (False, True)))


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_config_round_trip(name):
    fmt = FORMATS[name]
    accepted = 0
    for bits, g, sym, act in OPTION_GRID:
        if fmt.check_options(bits, g, sym, act) is not None:
            continue
        accepted += 1
        got = fmt.options_from_config(fmt.quantization_config(bits, g, sym, act))
        expect = {"bits": bits, "group_size": g, "sym": sym, "act_order": act and g != -1}
        assert {key: got[key] for key in expect} == expect, (bits, g, sym, act)
    assert accepted >= 2


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_packed_suffixes_are_declared(name):
    fmt = FORMATS[name]
    for bits, g, sym, act in [(4, 128, False, True), (4, 128, True, False), (4, 128, False, False)]:
        if fmt.check_options(bits, g, sym, act) is None:
            packed = fmt.pack(
                make_qw(128, 256, bits=bits, group_size=g, sym=sym, act_order=act, bias=True)
            )
            assert set(packed) - {"bias"} <= set(fmt.TENSOR_SUFFIXES)
            assert packed["bias"].dtype == torch.float16


def test_gptq_config_versions_and_transformers_accepts_it():
    transformers = pytest.importorskip("transformers")
    sym = gptq.quantization_config(4, 128, True, True)
    assert sym["checkpoint_format"] == sym["format"] == "gptq" and sym["desc_act"] is True
    asym = gptq.quantization_config(4, 128, False, False)
    assert asym["format"] == "gptq_v2"
    assert gptq.quantization_config(4, 128, False, False, version=1)["format"] == "gptq"
    assert gptq.quantization_config(4, -1, True, True)["desc_act"] is False
    assert gptq.options_from_config(asym)["version"] == 2
    assert (
        gptq.options_from_config({"bits": 4, "group_size": 128, "checkpoint_format": "gptq"})[
            "version"
        ]
        == 1
    )
    cfg = transformers.GPTQConfig.from_dict(dict(asym))
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.format) == (4, 128, False, "gptq_v2")


def test_awq_config_is_autoawq_gemm_and_transformers_accepts_it():
    transformers = pytest.importorskip("transformers")
    cfg = awq.quantization_config(4, 128, False, False)
    assert cfg == {
        "quant_method": "awq",
        "zero_point": True,
        "group_size": 128,
        "bits": 4,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    parsed = transformers.AwqConfig.from_dict(dict(cfg))
    assert (parsed.bits, parsed.group_size, parsed.zero_point) == (4, 128, True)
    legacy = {"w_bit": 4, "q_group_size": 64, "zero_point": True, "version": "GEMM"}
    assert awq.options_from_config(legacy) == {
        "bits": 4,
        "group_size": 64,
        "sym": False,
        "act_order": False,
    }
    with pytest.raises(FormatError):
        awq.options_from_config(
            {"bits": 4, "group_size": 128, "zero_point": True, "version": "gemv"}
        )


def test_marlin_configs():
    legacy = marlin.quantization_config(4, 128, True, False)
    assert legacy["quant_method"] == "gptq" and legacy["checkpoint_format"] == "marlin"
    assert (legacy["sym"], legacy["desc_act"]) == (True, False)
    for variant in (
        marlin.quantization_config(4, 128, False, False),
        marlin.quantization_config(4, 64, True, True),
    ):
        assert variant["quant_method"] == "qtool_marlin"  # no consumer may misread zp / g_idx
    hub = [
        {"quant_method": "marlin", "group_size": 128},
        {"quant_method": "gptq", "bits": 4, "group_size": -1, "is_marlin_format": True},
    ]
    for cfg in hub:
        assert marlin.options_from_config(cfg)["sym"] is True
    with pytest.raises(FormatError):
        marlin.options_from_config({"quant_method": "gptq", "bits": 4, "group_size": 128})


def test_marlin_check_layer_names_kernel_limits():
    reason = marlin.check_layer(4096, 576, 4, 64, True, True)
    assert "576" in reason and "128" in reason and "kernel limit" in reason  # the fix is the command's (qtool.fixes)
    assert "64" in marlin.check_layer(4000, 4096, 4, 128, True, False)
    assert "group_size=256" in marlin.check_options(4, 256, True, False)
    assert "128" in marlin.check_options(4, 64, True, False)  # legacy loader: -1/128 only
    assert marlin.check_options(4, 64, False, False) is None
    assert marlin.check_options(8, 128, True, False) is not None
    assert marlin.check_layer(4096, 11008, 4, 128, True, False) is None
    # the layout itself only needs k % 16: pack accepts what the kernel would refuse
    assert marlin.check_layer(64, 48, 4, -1, True, False) is not None
    assert set(marlin.pack(make_qw(64, 48, group_size=-1))) == {"B", "s"}


def test_checks_accept_common_shapes_and_refuse_with_a_fix():
    for fmt in FORMATS.values():
        sym = fmt is not awq
        assert fmt.check_layer(4096, 4096, 4, 128, sym, False) is None, fmt.NAME
        assert fmt.check_layer(11008, 4096, 4, 128, sym, False) is None, fmt.NAME
        reason = fmt.check_layer(4096, 4100, 4, 128, sym, False)
        assert reason and "4100" in reason, fmt.NAME
    assert "act-order" in awq.check_options(4, 128, False, True)
    assert "zero points" in awq.check_options(4, 128, True, False)
    assert "group" in awq.check_options(4, -1, False, False)
    assert gptq.check_options(3, 128, True, False) is not None
    assert (
        gptq.check_options(4, 128, False, False, version=1) is None
    )  # data-dependent: pack decides


def test_gptq_v1_asymmetric_without_zero_0_is_written():
    qw = make_qw(64, 128, group_size=64, sym=False, seed=9)
    fixed = qw.zeros.clone()
    fixed[fixed == 0] = 1
    ok = type(qw)(qw.codes, qw.scales, fixed, None, 4, 64, False)
    got = unpack_like(gptq, gptq.pack(ok, version=1), ok, version=1)
    assert got.equal(ok)
    with pytest.raises(UnsupportedError, match="--gptq-version 2"):
        gptq.pack(qw, version=1)


def test_scales_in_other_dtypes_only_when_exact():
    qw = make_qw(64, 128, group_size=64, sym=True)
    packed = gptq.pack(qw)
    exact = dict(packed, scales=packed["scales"].float())
    assert unpack_like(gptq, exact, qw).equal(qw)
    inexact = dict(packed, scales=packed["scales"].float() * (1 + 2**-20))
    with pytest.raises(FormatError, match="float16"):
        unpack_like(gptq, inexact, qw)


def test_unpack_rejects_mismatched_tensors():
    qw = make_qw(64, 128, group_size=64, sym=False)
    for fmt in FORMATS.values():
        if fmt.check_options(4, 64, False, False) is not None:
            continue
        packed = fmt.pack(qw)
        with pytest.raises(FormatError):
            fmt.unpack(packed, bits=4, group_size=64, sym=False, out_features=64, in_features=256)


def test_marlin_act_order_needs_both_perm_and_g_idx():
    qw = make_qw(64, 128, group_size=32, sym=True, act_order=True)
    packed = marlin.pack(qw)
    for drop in ("perm", "g_idx"):
        partial = {key: t for key, t in packed.items() if key != drop}
        with pytest.raises(FormatError, match="act-order"):
            unpack_like(marlin, partial, qw)
