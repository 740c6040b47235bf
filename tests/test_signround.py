"""``--method signround``: sign-gradient rounding (AutoRound's SignRound). Its start is
min-max round-to-nearest bit for bit; its steps are checked against a plain
implementation written here (one linear, the block output's squared error, signed
gradient steps with the linearly falling rate); on a block it lowers the output error
below RTN's; end to end through the CLI."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn as nn
from helpers import run_cli


class _OneLinear(nn.Module):
    """A decoder-block stand-in: one linear, called like a block (hidden states first,
    keyword arguments after), returning a tuple."""

    def __init__(self, n: int, k: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(k, n, bias=False)
        self.proj.weight.data = torch.randn(n, k) * 0.05
        self.proj.weight.data[:, 3] *= 8  # an outlier column

    def forward(self, hidden, **kwargs):
        return (self.proj(hidden),)


def _hidden(chunks: int, rows: int, k: int, seed: int) -> list[torch.Tensor]:
    """Calibration chunks ``[rows, 32, k]`` with correlated channels of uneven magnitude, as
    real activations have (with independent channels round-to-nearest is already the best
    rounding, and the steps only confirm it)."""
    torch.manual_seed(seed)
    mix = torch.eye(k) + 0.3 * torch.randn(k, k) / k**0.5
    scale = torch.rand(k) * 3 + 0.2
    return [(torch.randn(rows, 32, k) @ mix) * scale for _ in range(chunks)]


def _ctx(block, config, hidden):
    from qtool.pipeline import BlockContext, BlockInputs

    spec = types.SimpleNamespace(linears=["proj"])
    inputs = BlockInputs(hidden, [{} for _ in hidden])
    return BlockContext(block, 0, spec, config, inputs, torch.device("cpu"), torch.float32, "model.layers.0")


def _reference(w: torch.Tensor, chunks: list[torch.Tensor], order: list[int], steps: int, g: int, sym: bool):
    """SignRound on one linear, written out: per group ``s = (a*max(w,0) - b*min(w,0))/15``
    (symmetric: ``2*a*max|w|/15``, zero 8), ``q = clamp(round(w/s + v) + z, 0, 15)``,
    ``w_q = (q - z) * fp16(s)``; loss ``mean((x w_q^T - x w^T)^2)``; ``p -= lr * sign(dp)``
    with ``lr = (1 - t/T)/T``, ``v`` clamped to [-0.5, 0.5], ``a, b`` to [0.5, 1]; the
    parameters of the step with the lowest loss are the result."""
    n, k = w.shape
    wg = w.reshape(n, k // g, g)
    lo0, hi0 = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    v = torch.zeros_like(wg, requires_grad=True)
    a = torch.ones(n, k // g, requires_grad=True)
    b = torch.ones(n, k // g, requires_grad=True)

    def ste(x):
        return x + (x.round() - x).detach()

    def quant(round_):
        if sym:
            s = 2 * torch.maximum(-lo0, hi0) * a / 15
            z = torch.full_like(s, 8.0)
        else:
            s = (hi0 * a - lo0 * b) / 15
            z = round_(-(lo0 * b) / s).clamp(0, 15)
        s16 = s + (s.half().float() - s).detach()
        q = (round_(wg / s[..., None] + v) + z[..., None]).clamp(0, 15)
        return ((q - z[..., None]) * s16[..., None]).reshape(n, k), q, s16, z

    best = None
    for t in range(steps):
        x = chunks[order[t % len(chunks)]]
        loss = ((x @ quant(ste)[0].T - x @ w.T) ** 2).mean()
        if best is None or loss.item() < best[0]:
            best = (loss.item(), v.detach().clone(), a.detach().clone(), b.detach().clone())
        gv, ga, gb = torch.autograd.grad(loss, (v, a, b), allow_unused=True)
        lr = (1 - t / steps) / steps
        with torch.no_grad():
            v -= lr * torch.sign(gv)
            a -= lr * torch.sign(ga)
            if gb is not None:
                b -= lr * torch.sign(gb)
            v.clamp_(-0.5, 0.5)
            a.clamp_(0.5, 1)
            b.clamp_(0.5, 1)
    with torch.no_grad():
        v.copy_(best[1])
        a.copy_(best[2])
        b.copy_(best[3])
        return quant(torch.round)


@pytest.mark.parametrize("sym", [True, False])
def test_signround_starts_at_rtn_bit_for_bit(sym):
    from qtool.rtn import rtn_quantize
    from qtool.signround import SignRoundLinear

    lin = _OneLinear(48, 128, seed=1).proj
    lin.weight.data[5, :64] = 0.0  # a dead group
    got = SignRoundLinear(lin, 4, 64, sym).export()
    want = rtn_quantize(lin.weight, 4, 64, sym, fit_scale=False)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
    assert (got.zeros is None) == sym and (sym or torch.equal(got.zeros, want.zeros))


@pytest.mark.parametrize("sym", [True, False])
def test_signround_block_matches_a_plain_implementation(sym):
    from qtool.config import QuantizeConfig
    from qtool.signround import SignRoundMethod

    block = _OneLinear(32, 128, seed=2)
    hidden = _hidden(3, 2, 128, seed=3)
    config = QuantizeConfig(method="signround", group_size=64, sym=sym, rounding_steps=40, seed=5)
    w = block.proj.weight.detach().clone()
    out = SignRoundMethod(steps=40).quantize_block(_ctx(block, config, hidden))
    order = torch.randperm(3, generator=torch.Generator().manual_seed(5 + 0)).tolist()
    deq, q, s16, z = _reference(w, [h.reshape(-1, 128) for h in hidden], order, 40, 64, sym)
    qw = out["proj"].qweight
    assert torch.equal(qw.codes, q.reshape(32, 128).to(torch.uint8))
    assert torch.equal(qw.scales, s16.half())
    if not sym:
        assert torch.equal(qw.zeros, z.to(torch.uint8))
    torch.testing.assert_close(qw.dequantize(), deq, rtol=0, atol=0)
    assert block.proj is not None and isinstance(block.proj, nn.Linear)  # the float layer is back
    assert out["proj"].stats["rounded_differently_pct"] > 0  # the steps moved some codes off RTN


def test_signround_lowers_the_block_output_error_below_rtn():
    from qtool.config import QuantizeConfig
    from qtool.rtn import rtn_quantize
    from qtool.signround import SignRoundMethod

    block = _OneLinear(64, 256, seed=4)
    hidden = _hidden(4, 4, 256, seed=6)
    w = block.proj.weight.detach().clone()
    config = QuantizeConfig(method="signround", group_size=64, rounding_steps=100)
    qw = SignRoundMethod(steps=100).quantize_block(_ctx(block, config, hidden))["proj"].qweight
    x = torch.cat([h.reshape(-1, 256) for h in hidden])

    def err(deq):
        return float(((x @ deq.T - x @ w.T) ** 2).mean())

    rtn = err(rtn_quantize(w, 4, 64, True, fit_scale=False).dequantize())
    assert err(qw.dequantize()) < 0.92 * rtn  # measured: 0.0895 vs 0.1011


def test_signround_options_are_checked():
    from qtool.config import QuantizeConfig
    from qtool.errors import UserInputError

    with pytest.raises(UserInputError, match="--rounding-steps only applies to --method signround"):
        QuantizeConfig(method="gptq", rounding_steps=50)
    with pytest.raises(UserInputError, match="--rounding-steps must be >= 1"):
        QuantizeConfig(method="signround", rounding_steps=0)


def test_signround_cli_checkpoint(capsys, tmp_path, mini_llama, calib_txt):
    res = run_cli(capsys, "--json", "quantize", str(mini_llama), "-o", str(tmp_path / "sr"), "--method", "signround",
                  "-g", "64", "--calib", str(calib_txt), "--nsamples", "4", "--seqlen", "32", "--batch-size", "2",
                  "--rounding-steps", "4")
    assert res.code == 0, res.err
    record = res.json()
    assert record["config"]["method"] == "signround" and record["config"]["rounding_steps"] == 4
    stats = record["layers"]["model.layers.0.mlp.down_proj"]
    assert {"block_loss_first", "block_loss_best", "best_step", "rounded_differently_pct"} <= stats.keys()
    card = (tmp_path / "sr" / "README.md").read_text()
    assert "SIGNROUND (4 signed-gradient steps per block" in card
    check = run_cli(capsys, "inspect", str(tmp_path / "sr"), "--verify")
    assert check.code == 0, check.err


@pytest.mark.parametrize("method", ["signround", "rtn"])
def test_torchrun_is_refused_before_any_work(capsys, tmp_path, monkeypatch, mini_llama, calib_txt, method):
    """Two processes: refused before the process group is joined, with one line; nothing
    written."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    res = run_cli(capsys, "quantize", str(mini_llama), "-o", str(tmp_path / "out"), "--method", method,
                  "--calib", str(calib_txt), "--nsamples", "4", "--seqlen", "32")
    assert res.code != 0
    assert ("does not run under torchrun" if method == "signround" else "has none") in res.err
    assert len(res.err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [calib_txt.name]
