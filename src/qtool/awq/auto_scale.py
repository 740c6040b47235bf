"""AWQ scale search: per scaling group, the per-input-channel scales ``s`` that minimise
the consuming module's output error once the group's linears are quantized.

Candidates follow the paper: ``s = mean|x|^alpha`` for ``alpha`` on the grid
``0, 1/grid, ..., (grid-1)/grid``, normalised by ``sqrt(max(s) * min(s))`` so the scales
straddle 1. For a candidate, every linear of the group gets ``Q(W * s) / s`` (RTN
fake-quantized with the same rules as the final quantization) and the module output is
compared with its float output (MSE). ``alpha = 0`` is ``s = 1`` (plain RTN), so the
chosen scales never score worse than no scaling on the search tokens.

Two scorers share the grid search:

- ``search_module_scale`` re-runs a module (attention, MLP) on recorded calls;
- ``search_linear_scale`` scores a single consuming linear in closed form from the Gram
  matrix ``H = X^T X`` of its input: ``||dW X^T||^2 = sum((dW @ H) * dW)``, which costs
  ``n k^2`` per candidate whatever the number of tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from qtool import distributed
from qtool.awq.fake_quant import fake_quantize
from qtool.awq.stats import ModuleCalls
from qtool.errors import NumericsError

# Fake-quantized candidate weights are built this many floats at a time (bounded memory,
# few large tensor ops rather than many small ones).
BATCH_ELEMENTS = 1 << 23

# Floor of a scale before normalisation: channels that never activate (mean |x| = 0)
# get a tiny but finite scale, so folding never divides by zero.
MIN_SCALE = 1e-4


@dataclass(frozen=True)
class ScaleSearch:
    """Result of one group's search.

    Attributes:
        alpha: chosen exponent.
        scales: float32 ``[k]``, the chosen per-input-channel scales.
        loss: output MSE at ``alpha``.
        loss_unscaled: output MSE at ``alpha = 0`` (plain RTN).
    """

    alpha: float
    scales: torch.Tensor
    loss: float
    loss_unscaled: float


def candidate_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """float32 ``[k]``: ``mean_abs ** alpha``, floored at ``MIN_SCALE`` and normalised
    by ``sqrt(max * min)``. ``alpha = 0`` gives exactly ones; all-zero or uniform
    activations give ones up to rounding."""
    s = mean_abs.float().clamp_min(0.0).pow(alpha).clamp_min(MIN_SCALE)
    return s / (s.max() * s.min()).sqrt()


def scaled_fake_weights(weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                        sym: bool) -> torch.Tensor:
    """``Q(W * s) / s`` for a batch of candidate scales.

    Args:
        weight: float ``[n, k]``.
        scales: float ``[A, k]``, one row per candidate.

    Returns:
        float32 ``[A, n, k]``.
    """
    num, (n, k) = scales.shape[0], weight.shape
    s = scales.float()[:, None, :]  # [A, 1, k]
    scaled = (weight.float()[None] * s).reshape(num * n, k)
    return fake_quantize(scaled, bits, group_size, sym).reshape(num, n, k) / s


def grid_search(losses_of: Callable[[torch.Tensor], list[float]], mean_abs: torch.Tensor, grid: int,
                name: str, batch: int = 1) -> ScaleSearch:
    """Try ``alpha = i / grid`` for ``i < grid``; keep the first strict minimum.

    Args:
        losses_of: float ``[A, k]`` candidate scales -> their ``A`` losses.
        batch: candidates passed to ``losses_of`` at once.

    Raises:
        NumericsError: a candidate's loss is NaN or inf (``name`` is the group).
    """
    alphas = [i / grid for i in range(grid)]
    candidates = torch.stack([candidate_scales(mean_abs, a) for a in alphas])  # [grid, k]
    losses: list[float] = []
    for start in range(0, grid, max(batch, 1)):
        losses.extend(losses_of(candidates[start : start + batch]))
    for alpha, loss in zip(alphas, losses):
        if not math.isfinite(loss):
            raise NumericsError(
                f"AWQ scale search for {name}: output error is {loss} at alpha={alpha:.2f}; "
                "the activations or weights overflow, try --dtype float32")
    best = min(range(grid), key=lambda i: (losses[i], i))
    return ScaleSearch(alpha=alphas[best], scales=candidates[best].clone(), loss=losses[best], loss_unscaled=losses[0])


def _batch_for(elements_per_candidate: int) -> int:
    """Candidates per batch so that one batch of fake-quantized weights stays near
    ``BATCH_ELEMENTS`` floats."""
    return max(1, BATCH_ELEMENTS // max(elements_per_candidate, 1))


def search_module_scale(module: nn.Module, linears: Sequence[nn.Linear], calls: ModuleCalls,
                        mean_abs: torch.Tensor, bits: int, group_size: int, sym: bool, grid: int,
                        name: str) -> ScaleSearch:
    """Scales for ``linears`` (all inside ``module``) scored on ``module``'s output.

    Args:
        module: the consuming module (e.g. attention or MLP), in its compute dtype.
        linears: the group's linears (same in_features); their input channels get the scales.
        calls: recorded calls of ``module`` (the search subsample).
        mean_abs: float32 ``[k]`` mean |x| of the linears' shared input.
        bits, group_size, sym: the final quantization's parameters.
        grid: number of ``alpha`` candidates.
        name: the group, for error messages.

    The linears' weights are restored before returning (also on error).
    """
    originals = [lin.weight.data for lin in linears]
    rows = [w.shape[0] for w in originals]
    # quantization groups lie within a row, so the group's linears quantize as one matrix
    stacked = torch.cat([w.float() for w in originals])  # [sum n, k]
    # the float reference output, computed once per group
    targets = calls.replay(module)
    # with several processes each replays its own search chunks and the sums are the run's
    count = distributed.sum_counts(sum(t.numel() for t in targets))

    def losses_of(scales: torch.Tensor) -> list[float]:
        fakes = scaled_fake_weights(stacked, scales.to(stacked.device), bits, group_size, sym)  # [A, sum n, k]
        totals = []
        for fake in fakes:
            for lin, w, part in zip(linears, originals, fake.split(rows)):
                lin.weight.data = part.to(w.dtype)
            outs = calls.replay(module)
            totals.append(sum(float(((o.float() - t.float()) ** 2).sum(dtype=torch.float64))
                              for o, t in zip(outs, targets)))
        return [total / max(count, 1) for total in distributed.sum_floats(totals)]

    try:
        return grid_search(losses_of, mean_abs, grid, name, _batch_for(stacked.numel()))
    finally:
        for lin, w in zip(linears, originals):
            lin.weight.data = w


def search_linear_scale(weight: torch.Tensor, gram: torch.Tensor, num_tokens: int, mean_abs: torch.Tensor,
                        bits: int, group_size: int, sym: bool, grid: int, name: str) -> ScaleSearch:
    """Scales for one linear scored on its own output, in closed form.

    Args:
        weight: float ``[n, k]``.
        gram: float32 ``[k, k]``, ``X^T X`` of the linear's input over ``num_tokens`` tokens.
        mean_abs: float32 ``[k]``.
    """
    w = weight.detach().float()
    h = gram.to(w.device, torch.float32)
    denom = max(num_tokens, 1) * w.shape[0]

    def losses_of(scales: torch.Tensor) -> list[float]:
        dw = scaled_fake_weights(w, scales.to(w.device), bits, group_size, sym) - w  # [A, n, k]
        return [float(v) / denom for v in ((dw @ h) * dw).sum(dim=(1, 2), dtype=torch.float64)]

    return grid_search(losses_of, mean_abs, grid, name, _batch_for(w.numel()))
