"""Proof, before any calibration, that every AWQ fold keeps the float model's function.

For every block, on its real inputs (``qtool.models.layout.probe_blocks``: a float32 copy
of the block called with the arguments the model's own forward gives it, on a short
deterministic token sequence), every scaling group of the family file that applies to
the block gets deterministic, non-trivial scales ``s = exp(u)``, ``u`` uniform in
[-1, 1] (seeded by block and group), folded into the copy exactly as AWQ will fold its
searched ones (``fold_scales`` with the group's ``Producer``); all of the block's folds
at once, as AWQ leaves them. The folded block's output ``y'`` is compared with the
unfolded output ``y``; with ``x`` the block's input the folds are proven when

    max|y' - y| <= RTOL * max|y - x| + ULPS * eps_float32 * max|y|,   RTOL = 1e-4, ULPS = 8,

i.e. relative to what the block adds to its input (the residual stream would hide an
error), plus a few float32 roundings at the output's magnitude (where the residual adds
round). A correct fold moves the output by float rounding (about 1e-6 of the block's
contribution); a wrong one (a ``(1 + w)`` norm folded as ``x * w``, a norm that is not
its group's only input) by a fraction comparable to the scales' spread (about 1e-1).
Independent random scales cannot make wrong folds cancel. When the block fails, the
folds are undone (folding ``1 / s``) and tried one at a time to name the failing group.

Cost: one float32 forward of each block on ``PROBE_TOKENS`` tokens on top of the layout
check's pass; layout check and proof together take about 1.5 s for the 135M default
model (30 blocks, 3 groups each) on 2 busy CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qtool.awq.apply import fold_scales
from qtool.errors import UnsupportedError
from qtool.models import is_registered
from qtool.models.base import ArchSpec, ScaleGroup
from qtool.models.layout import BlockProbe

RTOL = 1e-4
ULPS = 8


@dataclass(frozen=True)
class FoldProof:
    """One proven fold: block prefix, the group's producer, and ``max|y' - y| / max|y - x|``
    of the block with all its folds."""

    block: str
    group: str
    rel_error: float


def probe_scales(k: int, seed: int) -> torch.Tensor:
    """float32 ``[k]``: ``exp(u)``, ``u`` uniform in [-1, 1] from a generator seeded with ``seed``."""
    u = torch.rand(k, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return u.exp()


def prove_folds(spec: ArchSpec, probe: BlockProbe) -> list[FoldProof]:
    """Prove the scaling groups of ``spec`` that apply to the probed block. The probe's
    block copy is left with the probe scales folded in.

    Raises:
        UnsupportedError: a group's modules are missing or of the wrong kind, or its fold
            changes the block's output beyond the tolerance; one line naming the block,
            the group and the fix (``--method gptq`` or ``rtn``).
    """
    spec = spec.for_block(probe.index)  # the probed block's own groups where blocks differ
    block, x, y = probe.block, probe.args[0], probe.output
    contribution = float((y - x).abs().max()) if y.shape == x.shape else float(y.abs().max())
    tol = RTOL * contribution + ULPS * torch.finfo(torch.float32).eps * float(y.abs().max())
    folds = []
    for g, group in enumerate(spec.scale_groups):
        missing = [n for n in dict.fromkeys((group.prev, group.module, *group.linears)) if not _has(block, n)]
        if missing:
            raise _refusal(spec, probe, group, f"the block has no {', '.join(missing)}")
        if group.applies_to(block):
            k = block.get_submodule(group.linears[0]).in_features
            folds.append((group, probe_scales(k, 1000 * probe.index + g)))
    for group, scales in folds:
        _fold(spec, probe, group, scales)
    err = float((probe.run() - y).abs().max())
    if not err <= tol:  # NaN fails too
        for group, scales in reversed(folds):
            _fold(spec, probe, group, 1.0 / scales)
        for group, scales in folds:
            _fold(spec, probe, group, scales)
            alone = float((probe.run() - y).abs().max())
            if not alone <= tol:
                raise _refusal(spec, probe, group, f"folding changes the float block's output by "
                                                   f"{_relative(alone, contribution):.2g} of what the block adds "
                                                   f"(limit {RTOL:g}), so '{group.prev}' is not a {group.kind.value} "
                                                   "producer feeding only these linears")
            _fold(spec, probe, group, 1.0 / scales)
        raise UnsupportedError(f"AWQ cannot fold the scales of {probe.prefix}: each fold keeps the float block's "
                               f"output but together they change it by {_relative(err, contribution):.2g} of what "
                               f"the block adds (limit {RTOL:g}); use --method gptq or rtn")
    return [FoldProof(probe.prefix, group.prev, _relative(err, contribution)) for group, _ in folds]


def _fold(spec: ArchSpec, probe: BlockProbe, group: ScaleGroup, scales: torch.Tensor) -> None:
    prev = probe.block.get_submodule(group.prev)
    try:
        fold_scales(prev, [probe.block.get_submodule(n) for n in group.linears], scales,
                    f"{probe.prefix}.{group.prev}", kind=group.kind, rows=group.rows(probe.block))
    except UnsupportedError:
        raise _refusal(spec, probe, group, f"'{group.prev}' ({type(prev).__name__}) is not a {group.kind.value} "
                                           f"producer of {scales.numel()} channels") from None


def _relative(err: float, contribution: float) -> float:
    return err / contribution if contribution > 0 else err


def _has(block: nn.Module, name: str) -> bool:
    try:
        block.get_submodule(name)
    except AttributeError:
        return False
    return True


def _refusal(spec: ArchSpec, probe: BlockProbe, group: ScaleGroup, why: str) -> UnsupportedError:
    fold = f"{probe.prefix}.{group.prev} -> {'/'.join(n.rsplit('.', 1)[-1] for n in group.linears)}"
    if is_registered(spec):
        cause = f"qtool's '{spec.name}' family file is wrong for this model, please report it"
    else:
        cause = f"'{spec.model_types[0]}' is not registered (add a file under qtool/models/ to support AWQ)"
    return UnsupportedError(f"AWQ cannot fold {fold}: {why}; {cause}; use --method gptq or rtn")
