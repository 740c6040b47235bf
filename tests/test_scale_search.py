"""``--scale-search mse``: each group's range is the shrink of its min-max range, on a
grid, that reproduces the group best. Checked against a brute force over the grid written
here (per row, per candidate, in float64), for RTN and for the GPTQ solver (where the
search runs on the error-updated weights at each group's first column, weighted by the
Hessian diagonal), plus end-to-end runs through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_same_projection_weights, run_cli
from qtool.gptq import gptq_quantize
from qtool.rtn import group_qparams, mse_qparams, rtn_quantize, shrink_ratios

GRID = [1.0 - 0.25 * i / 25 for i in range(26)]  # 1.0, 0.99, ..., 0.75


def weights(n: int, k: int, seed: int) -> torch.Tensor:
    """Heavy-tailed rows (Student-t), where cutting outliers pays off."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, k, generator=g) / torch.rand(n, k, generator=g).add(0.05).sqrt()
    return t * torch.rand(n, 1, generator=g).add(0.1)


def candidates(row: torch.Tensor, bits: int, sym: bool):
    """Every grid candidate of one row as ``(scale, zero)`` floats, from the textbook
    formulas in float32 (as stored and used): the range ``[min(w, 0), max(w, 0)]`` times
    ``p``; symmetric: ``+-p max|w|`` around the midpoint zero. (Float32 matters: with the
    min-max range an extreme weight lands exactly on a rounding tie.)"""
    maxq = 2**bits - 1
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    lo, hi = torch.clamp(row.float().min(), max=0.0), torch.clamp(row.float().max(), min=0.0)
    out = []
    for p in GRID:
        a, b = f32(p) * lo, f32(p) * hi
        if sym:
            b = torch.maximum(-a, b)
            a = -b
        if a == 0 and b == 0:
            a, b = f32(-1.0), f32(1.0)
        scale = torch.clamp((b - a) / maxq, min=torch.finfo(torch.float16).tiny)
        zero = float(2 ** (bits - 1)) if sym else float(torch.clamp(torch.round(-a / scale), 0, maxq))
        out.append((float(scale), zero))
    return out


def candidate_error(row: torch.Tensor, scale: float, zero: float, bits: int, weight: torch.Tensor) -> float:
    """Squared error (summed in float64) of ``row`` rounded with the float32 ``scale`` and
    ``zero`` and stored with the float16 scale, each column weighted."""
    codes = torch.clamp(torch.round(row.float() / torch.tensor(scale, dtype=torch.float32)) + zero, 0, 2**bits - 1)
    stored = float(torch.tensor(scale, dtype=torch.float32).half())
    return float((weight.double() * (row.double() - (codes.double() - zero) * stored) ** 2).sum())


def brute_force(w: torch.Tensor, bits: int, sym: bool, weight: torch.Tensor | None = None):
    """Per row: every candidate's error, and the index of the first best."""
    weight = torch.ones(w.shape[1]) if weight is None else weight
    errors = torch.tensor([[candidate_error(row, s, z, bits, weight) for s, z in candidates(row, bits, sym)]
                           for row in w])  # [n, C] float64
    return errors, errors.argmin(dim=1)


def chosen_error(row, scale, zero, bits, weight) -> float:
    return candidate_error(row, float(scale), float(zero), bits, weight)


@pytest.mark.parametrize("bits,sym,weighted", [(4, True, False), (4, False, False), (4, False, True), (8, True, True)])
def test_mse_qparams_equals_brute_force(bits, sym, weighted):
    w = weights(96, 64, seed=1)
    imp = torch.rand(64, generator=torch.Generator().manual_seed(2)) * 3 if weighted else None
    scale, zero = mse_qparams(w, bits, sym, shrink_ratios(25, 0.25), imp)
    errors, best = brute_force(w, bits, sym, imp)
    weight = torch.ones(64) if imp is None else imp
    same = 0
    for j, row in enumerate(w):
        s_ref, z_ref = candidates(row, bits, sym)[int(best[j])]
        got = chosen_error(row, scale[j], zero[j], bits, weight)
        # the brute force sums in float64: on a near-tie the pick may differ, never the error
        assert got <= float(errors[j].min()) * (1 + 1e-5) + 1e-12, j
        same += float(scale[j]) == pytest.approx(s_ref, rel=1e-6) and float(zero[j]) == z_ref
    assert same >= 0.95 * len(w)
    # the search did something: many rows are shrunk, and min-max is never better
    minmax = errors[:, 0]
    assert (best > 0).float().mean() > 0.2
    assert (errors.min(dim=1).values <= minmax).all()


def test_single_ratio_is_minmax():
    w = weights(64, 32, seed=3)
    for sym in (True, False):
        got = mse_qparams(w, 4, sym, torch.ones(1))
        ref = group_qparams(w, 4, sym)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_dead_and_tiny_rows_stay_finite():
    w = torch.zeros(3, 64)
    w[1, 5] = 1e-9
    w[2] = weights(1, 64, seed=4)
    for sym in (True, False):
        qw = rtn_quantize(w, 4, 64, sym, ratios=shrink_ratios(25, 0.25))
        assert torch.isfinite(qw.scales.float()).all()
        assert torch.equal(qw.dequantize()[0], torch.zeros(64))


@pytest.mark.parametrize("sym", [True, False])
def test_rtn_mse_groups_equal_brute_force_and_beat_minmax(sym):
    """RTN with ``ratios``: each group's codes are the rounding with its brute-force best
    candidate; the weight error is lower than min-max's in every group (nearest float16
    scale on both sides) and clearly lower in total (storage fit on both sides)."""
    w = weights(32, 256, seed=5)
    ratios = shrink_ratios(25, 0.25)
    near = rtn_quantize(w, 4, 64, sym, fit_scale=False, ratios=ratios)
    groups = w.reshape(-1, 64)  # [n*G, g]
    errors, best = brute_force(groups, 4, sym)
    deq = near.dequantize().reshape(-1, 64)
    got = ((groups.double() - deq.double()) ** 2).sum(dim=1)
    assert (got <= errors.min(dim=1).values * (1 + 1e-5) + 1e-12).all()
    assert (got <= errors[:, 0] * (1 + 1e-5)).all()
    fit = rtn_quantize(w, 4, 64, sym, ratios=ratios)
    assert torch.equal(fit.codes, near.codes)  # the storage fit only moves the scale
    minmax = rtn_quantize(w, 4, 64, sym)
    err = lambda qw: float(((w - qw.dequantize()) ** 2).sum())  # noqa: E731
    assert err(fit) < 0.97 * err(minmax)


# --- GPTQ -------------------------------------------------------------------------------

def correlated_inputs(rows: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, k, generator=g)
    a = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    return (z @ a) * torch.rand(k, generator=g).add(0.1)


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_identity_hessian_equals_rtn_mse(sym):
    w = weights(48, 256, seed=6)
    ratios = shrink_ratios(25, 0.25)
    res = gptq_quantize(w, torch.eye(256), group_size=64, sym=sym, ratios=ratios)
    assert res.qweight.equal(rtn_quantize(w, 4, 64, sym, fit_scale=False, ratios=ratios))


def test_gptq_diagonal_hessian_weights_each_group_by_it():
    """A diagonal Hessian spreads no error between columns, so each group's parameters are
    the brute-force best with the Hessian diagonal as column weights."""
    w = weights(40, 128, seed=7)
    diag = torch.rand(128, generator=torch.Generator().manual_seed(8)).add(0.05) ** 3
    res = gptq_quantize(w, torch.diag(diag), group_size=32, sym=False, ratios=shrink_ratios(25, 0.25))
    qw = res.qweight
    for gi in range(4):
        cols = slice(gi * 32, (gi + 1) * 32)
        errors, _ = brute_force(w[:, cols], 4, False, diag[cols])
        for j in range(40):
            got = chosen_error(w[j, cols], qw.scales[j, gi].float(), qw.zeros[j, gi].float(), 4, diag[cols])
            assert got <= float(errors[j].min()) * (1 + 1e-3) + 1e-12, (gi, j)


@pytest.mark.parametrize("act_order,sym", [(True, True), (False, False)])
def test_gptq_groups_searched_on_updated_weights(act_order, sym):
    """Replay of the OBS updates in float64 with the emitted codes: at each group's first
    column (solve order), the stored parameters are, for the weights updated so far, as good
    as the brute-force best (Hessian-diagonal weighted) and often better than min-max; every
    code is the rounding of its updated weight."""
    n, k, g = 32, 128, 32
    w = weights(n, k, seed=9) * 0.05
    x = correlated_inputs(2048, k, seed=10)
    h = 2.0 / x.shape[0] * x.T @ x
    res = gptq_quantize(w, h, group_size=g, sym=sym, act_order=act_order, ratios=shrink_ratios(25, 0.25))
    qw = res.qweight
    hd = h.double().clone()
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(k)
    hd.diagonal().add_(res.damp_used * hd.diagonal().mean())
    hp = hd[perm][:, perm]
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hp)), upper=True)
    wr = w.double()[:, perm].clone()
    gi = qw.group_index()[perm]
    s = qw.scales.double()[:, gi]
    z = qw.zeros_or_midpoint().double()[:, gi]
    codes = qw.codes[:, perm].double()
    importance = h.diagonal()[perm]
    shrunk = 0
    for j in range(k):
        if j % g == 0:
            cols = slice(j, j + g)
            errors, _ = brute_force(wr[:, cols].float(), 4, sym, importance[cols])
            for r in range(n):
                got = chosen_error(wr[r, cols].float(), s[r, j], z[r, j], 4, importance[cols])
                assert got <= float(errors[r].min()) * (1 + 1e-3) + 1e-12, (j, r)
                shrunk += got < float(errors[r, 0]) * (1 - 1e-3)
        xq = wr[:, j] / s[:, j] + z[:, j]
        tie = ((xq - xq.floor()) - 0.5).abs() < 1e-2 + (xq - z[:, j]).abs() * 2**-10
        assert ((codes[:, j] == torch.clamp(torch.round(xq), 0, 15)) | tie).all(), j
        err = (wr[:, j] - (codes[:, j] - z[:, j]) * s[:, j]) / u[j, j]
        wr[:, j:] -= err[:, None] * u[j, j:]
    assert shrunk > 0.2 * n * (k // g)


def test_gptq_mse_lowers_output_error():
    w = weights(64, 256, seed=11) * 0.05
    x = correlated_inputs(4096, 256, seed=12)
    h = 2.0 / x.shape[0] * x.T @ x
    out = {}
    for search, ratios in (("minmax", None), ("mse", shrink_ratios(25, 0.25))):
        qw = gptq_quantize(w, h, group_size=64, sym=True, act_order=True, ratios=ratios).qweight
        out[search] = float((x @ (w - qw.dequantize()).T).square().sum())
    assert out["mse"] < 0.95 * out["minmax"], out


# --- end to end ---------------------------------------------------------------------------

def _run(capsys, *args):
    res = run_cli(capsys, "--json", "quantize", *map(str, args))
    assert res.code == 0, res.err
    return res.json()


def test_gptq_cli_mse_into_compressed_tensors_and_gptq(capsys, tmp_path, mini_llama, calib_txt):
    """The same GPTQ run (static groups) stored in both formats reads back to the same
    weights; qtool.json records the search and the card says it."""

    common = [mini_llama, "--method", "gptq", "-g", "64", "--scale-search", "mse", "--calib", calib_txt,
              "--nsamples", "4", "--seqlen", "64", "--batch-size", "4", "--static-groups"]
    ct = _run(capsys, *common, "--format", "compressed-tensors", "-o", tmp_path / "ct")
    gp = _run(capsys, *common, "--format", "gptq", "-o", tmp_path / "gptq")
    assert ct["config"]["scale_search"] == gp["config"]["scale_search"] == "mse"
    assert json.loads((tmp_path / "gptq" / "qtool.json").read_text())["config"]["scale_search"] == "mse"
    assert "MSE search" in (tmp_path / "gptq" / "README.md").read_text()
    assert_same_projection_weights(tmp_path / "ct", tmp_path / "gptq", 14)
    assert "model.layers.0.mlp.down_proj.weight_scale" in load_file(str(tmp_path / "ct" / "model.safetensors"))


def test_scale_search_options_are_checked(capsys, tmp_path, mini_llama):
    for args, needle in ((["--scale-search", "l2"], "unknown --scale-search"),
                         (["--scale-grid", "10"], "only apply with --scale-search mse"),
                         (["--scale-search", "mse", "--scale-max-shrink", "1.5"], "--scale-max-shrink in (0, 1)"),
                         (["--method", "awq", "--scale-search", "mse"], "does not apply to --method awq"),
                         (["--method", "rtn", "--scale-search", "mse"], "not offered with --method rtn")):
        res = run_cli(capsys, "quantize", mini_llama, "-o", tmp_path / "o", *args)
        assert res.code == 1 and needle in res.err, (args, res.err)
        assert not (tmp_path / "o").exists()
