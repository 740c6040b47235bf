"""RTN primitives: min-max parameters, codes from the exact scale, and the float16
storage fit (of the two float16 neighbours of the exact scale, the better one)."""

from __future__ import annotations

import pytest
import torch

from qtool.rtn import fit_storage_scale, group_qparams, quantize_to_codes, rtn_quantize


def weights(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)


def group_errors(w, qw, group_size):
    n, k = w.shape
    return ((w - qw.dequantize()) ** 2).reshape(n, k // group_size, group_size).sum(-1)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_storage_fit_never_worse_than_nearest_float16(sym, bits):
    w = weights(256, 256, seed=1)
    fit = rtn_quantize(w, bits, 64, sym)
    near = rtn_quantize(w, bits, 64, sym, fit_scale=False)
    assert torch.equal(fit.codes, near.codes)  # same codes, only the stored scale differs
    if not sym:
        assert torch.equal(fit.zeros, near.zeros)
    e_fit, e_near = group_errors(w, fit, 64), group_errors(w, near, 64)
    # the choice is made in float64; a float32 re-evaluation may differ by rounding on ties
    assert (e_fit <= e_near * (1 + 1e-6)).all()
    changed = fit.scales != near.scales
    assert changed.sum() > 100 and (e_fit[changed] <= e_near[changed] * (1 + 1e-6)).all()
    assert e_fit.sum() < e_near.sum()
    # a changed scale is the other float16 neighbour of the exact scale
    exact, _ = group_qparams(w.reshape(-1, 64), bits, sym)
    exact = exact.reshape(256, 4)
    lo = torch.minimum(fit.scales.float(), near.scales.float())
    hi = torch.maximum(fit.scales.float(), near.scales.float())
    assert ((lo <= exact) & (exact <= hi))[changed].all()
    assert torch.equal(torch.nextafter(lo.half(), torch.full_like(lo.half(), float("inf")))[changed], hi.half()[changed])


def test_storage_fit_keeps_nearest_on_exact_and_tied_scales():
    # a scale that float16 holds exactly has no other candidate
    w = torch.tensor([[-1.0, 0.5, 0.25, 7.5]])
    scale, zero = group_qparams(w, 4, True)
    codes = quantize_to_codes(w, scale[:, None], zero[:, None], 4)
    assert torch.equal(fit_storage_scale(w, codes, zero[:, None], scale), scale)


def test_storage_fit_guards_all_zero_and_tiny_groups():
    w = torch.zeros(3, 32)
    w[1, 0] = 1e-9  # its scale is clamped to the smallest normal float16
    qw = rtn_quantize(w, 4, 32, False)
    assert torch.isfinite(qw.scales.float()).all() and (qw.scales.float() >= torch.finfo(torch.float16).tiny).all()
    assert torch.equal(qw.dequantize()[0], torch.zeros(32))


def test_codes_use_the_exact_scale():
    """Codes follow the float32 min-max scale, written out independently here (symmetric:
    ``max|w| / 7.5``, zero 8), not the float16 scale that is stored."""
    w = weights(64, 128, seed=2)
    groups = w.reshape(-1, 64)
    amax = groups.abs().amax(dim=1, keepdim=True)
    exact = amax * 2 / 15
    expected = torch.clamp(torch.round(groups / exact) + 8, 0, 15).reshape(64, 128)
    codes = rtn_quantize(w, 4, 64, True).codes
    assert torch.equal(codes, expected.to(torch.uint8))
    fp16_first = torch.clamp(torch.round(groups / exact.half().float()) + 8, 0, 15).reshape(64, 128)
    assert not torch.equal(codes, fp16_first.to(torch.uint8))  # the two do differ on ties
