"""Sign-gradient rounding (``--method signround``): AutoRound's SignRound (Cheng et al.,
"Optimize Weight Rounding via Signed Gradient Descent for the Quantization of LLMs", 2023).

Round-to-nearest decides every weight's code on its own. SignRound learns, per block, a
rounding offset ``V`` in ``[-0.5, 0.5]`` for every weight and two range factors
``alpha, beta`` in ``[0.5, 1]`` per group (how much of the group's max and min the grid
spans) so that the quantized block reproduces the float block's output:

    scale = (alpha * max(w, 0) - beta * min(w, 0)) / maxq          (asymmetric)
    scale = 2 * alpha * max|w| / maxq,  zero = 2**(bits-1)          (symmetric)
    zero  = round(-beta * min(w, 0) / scale)
    q     = clamp(round(w / scale + V) + zero, 0, maxq)
    w_q   = (q - zero) * fp16(scale)

The loss is the mean squared difference between the block's output with every linear at
``w_q`` and the float block's output on the same inputs (the block's inputs as the
quantized earlier blocks produce them, the stream every method here calibrates on).
Rounding passes gradients straight through; each step moves every parameter by
``lr`` times the sign of its gradient (signed gradient descent), ``lr`` falling linearly
from ``1 / steps`` to 0, one calibration chunk (``--batch-size`` samples) per step, the
chunks in a seeded order. The parameters kept are those of the step whose chunk loss
was the lowest (AutoRound's choice; step 0 is round-to-nearest, so a block whose steps
only made things worse keeps RTN's codes). With ``V = 0, alpha = beta = 1`` this is exactly the min-max
round-to-nearest of ``qtool.rtn`` (codes from the exact scale, the float16 scale stored),
so the method starts from RTN and moves only where the block's output says so.

Several processes (torchrun) are refused before any work (``qtool.api``): each would
need the gradients summed over the processes before the sign is taken, and a test
holding that to one process's result.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from qtool.layer_error import layer_errors
from qtool.pipeline import BlockContext, LayerResult, _to, swap_submodule
from qtool.qtensor import QuantizedWeight
from qtool.rtn import minmax_qparams, quantize_to_codes

RANGE_MIN = 0.5  # alpha and beta stay in [RANGE_MIN, 1]: the grid keeps at least half of each side


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (straight-through)."""
    return x + (torch.round(x) - x).detach()


class SignRoundLinear(nn.Module):
    """Stands in for one ``nn.Linear`` during the search: its forward uses the weight
    quantized with the current ``v``, ``alpha`` and ``beta``.

    Args:
        linear: the float layer (its weight is read, never changed).
        bits: code width.
        group_size: divides ``in_features``, or -1 for one group per row.
        sym: symmetric or asymmetric.
    """

    def __init__(self, linear: nn.Linear, bits: int, group_size: int, sym: bool):
        super().__init__()
        n, k = linear.weight.shape
        g = k if group_size == -1 else group_size
        assert k % g == 0, (k, g)
        self.bits, self.group_size, self.sym, self.maxq = bits, group_size, sym, 2**bits - 1
        self.bias = None if linear.bias is None else linear.bias.detach()
        w = linear.weight.detach().float().reshape(n, k // g, g)  # [n, G, g]
        self.register_buffer("w", w)
        wmin, wmax = w.amin(dim=-1).clamp(max=0.0), w.amax(dim=-1).clamp(min=0.0)  # [n, G], the range holds 0
        dead = (wmin == 0) & (wmax == 0)  # as qtool.rtn.minmax_qparams: an all-zero group gets (-1, 1)
        self.register_buffer("wmin", torch.where(dead, -torch.ones_like(wmin), wmin))
        self.register_buffer("wmax", torch.where(dead, torch.ones_like(wmax), wmax))
        self.v = nn.Parameter(torch.zeros_like(w))
        self.alpha = nn.Parameter(torch.ones_like(self.wmax))
        self.beta = nn.Parameter(torch.ones_like(self.wmin))

    def qparams(self, ste: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero)`` float32 ``[n, G]``: the exact scale and the integer zero."""
        tiny = torch.finfo(torch.float16).tiny
        if self.sym:
            scale = (2 * torch.maximum(-self.wmin, self.wmax) * self.alpha / self.maxq).clamp(min=tiny)
            return scale, torch.full_like(scale, float(2 ** (self.bits - 1))).detach()
        lo, hi = self.wmin * self.beta, self.wmax * self.alpha
        scale = ((hi - lo) / self.maxq).clamp(min=tiny)
        return scale, (_round_ste if ste else torch.round)(-lo / scale).clamp(0, self.maxq)

    def quantized(self, ste: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dequantized [n, k], codes [n, G, g], stored scale [n, G], zero [n, G])``."""
        rnd = _round_ste if ste else torch.round
        scale, zero = self.qparams(ste)
        stored = scale + (scale.to(torch.float16).float() - scale).detach()  # the float16 value, gradient of the exact one
        codes = torch.clamp(rnd(self.w / scale[..., None] + self.v) + zero[..., None], 0, self.maxq)
        deq = (codes - zero[..., None]) * stored[..., None]
        return deq.reshape(self.w.shape[0], -1), codes, stored, zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized()[0].to(x.dtype), self.bias)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """One signed-gradient step of size ``lr``, then the parameters back into range."""
        for p in (self.v, self.alpha, self.beta):
            if p.grad is not None:
                p.sub_(lr * torch.sign(p.grad))
        self.v.clamp_(-0.5, 0.5)
        self.alpha.clamp_(RANGE_MIN, 1.0)
        self.beta.clamp_(RANGE_MIN, 1.0)

    @torch.no_grad()
    def export(self) -> QuantizedWeight:
        """The canonical quantized weight the current parameters give (what the forward
        computes, exactly)."""
        n = self.w.shape[0]
        _, codes, stored, zero = self.quantized(ste=False)
        return QuantizedWeight(
            codes=codes.reshape(n, -1).to(torch.uint8),
            scales=stored.to(torch.float16),
            zeros=None if self.sym else zero.to(torch.uint8),
            g_idx=None,
            bits=self.bits,
            group_size=self.group_size,
            sym=self.sym,
            bias=None if self.bias is None else self.bias.to("cpu").clone(),
        )


class SignRoundMethod:
    """Sign-gradient rounding of every linear of a block, jointly, against the float
    block's output.

    Args:
        steps: signed-gradient steps per block (``--rounding-steps``).
    """

    name = "signround"
    needs_calibration = True

    def __init__(self, steps: int = 200):
        self.steps = steps

    def quantize_block(self, ctx: BlockContext) -> dict[str, LayerResult]:
        cfg = ctx.config
        names = [n for n in ctx.spec.linears if n not in ctx.keep_float]
        if not names:
            return {}
        t0 = time.perf_counter()
        targets = ctx.run(collect_outputs=True)  # the float block's outputs, one per chunk
        wrappers = {n: SignRoundLinear(ctx.linear(n), cfg.bits_for(ctx.full_name(n)), cfg.group_size, cfg.symmetric)
                    for n in names}
        originals = {n: swap_submodule(ctx.block, n, w) for n, w in wrappers.items()}
        frozen = [p for p in ctx.block.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        for w in wrappers.values():
            w.requires_grad_(True)
        chunks = len(ctx.inputs.hidden)
        order = torch.randperm(chunks, generator=torch.Generator().manual_seed(cfg.seed + ctx.index)).tolist()
        params = [p for w in wrappers.values() for p in (w.v, w.alpha, w.beta)]
        first = best = None
        kept = [p.detach().clone() for p in params]
        try:
            for step in range(self.steps):
                i = order[step % chunks]
                # copies: the stored chunks are inference tensors, which autograd cannot save
                out = ctx.block(_to(ctx.inputs.hidden[i], ctx.device, copy=True),
                                **_to(ctx.inputs.kwargs[i], ctx.device, ctx.dtype, copy=True))
                out = out[0] if isinstance(out, tuple) else out
                loss = F.mse_loss(out, _to(targets[i], ctx.device, copy=True))
                value = loss.item()
                first = value if first is None else first
                if best is None or value < best:  # the parameters this loss was measured with
                    best, best_step = value, step
                    for k, p in zip(kept, params):
                        k.copy_(p.detach())
                for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True)):
                    p.grad = g  # None for beta when symmetric: no step
                lr = (1.0 - step / self.steps) / self.steps
                for w in wrappers.values():
                    w.step(lr)
            with torch.no_grad():
                for k, p in zip(kept, params):
                    p.copy_(k)
        finally:
            for p in frozen:
                p.requires_grad_(True)
            for n, lin in originals.items():
                swap_submodule(ctx.block, n, lin)
        targets.clear()
        seconds = round((time.perf_counter() - t0) / len(names), 3)
        out = {}
        for n, w in wrappers.items():
            qw = w.export()
            lin = ctx.linear(n)
            stats = layer_errors(lin.weight, qw.dequantize().to(lin.weight.device))
            stats.update({"block_loss_first": first, "block_loss_best": best, "best_step": best_step,
                          "alpha_mean": float(w.alpha.detach().mean()), "beta_mean": float(w.beta.detach().mean()),
                          "rounded_differently_pct": float((qw.codes.view_as(w.w) != _rtn_codes(w)).float().mean() * 100),
                          "seconds": seconds})
            out[n] = LayerResult(qw, stats)
        return out


@torch.no_grad()
def _rtn_codes(w: SignRoundLinear) -> torch.Tensor:
    """The codes min-max round-to-nearest (``qtool.rtn``) gives the same weight."""
    scale, zero = minmax_qparams(w.wmin.reshape(-1), w.wmax.reshape(-1), w.bits, w.sym)
    return quantize_to_codes(w.w, scale.view_as(w.wmin)[..., None], zero.view_as(w.wmin)[..., None], w.bits)
