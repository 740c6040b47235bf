"""Mixed precision under a size budget: which bit width each layer gets.

Every layer has a few candidate settings (e.g. 4-bit and 8-bit at the run's group size),
each with its size on disk in the output format (``layer_bytes``: codes, scales, zeros
and act-order indices, measured by packing a stand-in layer) and a measured loss (the
sensitivity: the divergence of the model when only that layer is at that setting). The
choice minimises the sum of the losses with the total size at most the budget: a
multiple-choice knapsack, solved exactly (``solve``) by dynamic programming over the
Pareto front of (size, loss) of the layers chosen so far.

The budget is stated as average bits per weight including scales
(``--bits-budget 4.25``): ``budget_bits * weights / 8`` bytes for the quantized layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from qtool.errors import UserInputError


@dataclass(frozen=True)
class Choice:
    """One candidate setting of a layer: its size on disk and its measured loss."""

    setting: object  # what the caller applies (e.g. the bit width)
    nbytes: int
    loss: float


def layer_bytes(fmt_name: str, options: dict, shape: tuple[int, int], bits: int, group_size: int, sym: bool,
                act_order: bool = False) -> int:
    """Bytes a layer of ``shape`` takes in format ``fmt_name`` at this setting: the format's
    own packer run on a stand-in layer (zero codes), so the count is what is written."""
    from qtool.pack import get_format
    from qtool.qtensor import QuantizedWeight

    n, k = shape
    groups = 1 if group_size == -1 else -(-k // group_size)
    g_idx = (torch.arange(k, dtype=torch.int32) // (k if group_size == -1 else group_size)) if act_order else None
    qw = QuantizedWeight(codes=torch.zeros(n, k, dtype=torch.uint8), scales=torch.ones(n, groups, dtype=torch.float16),
                         zeros=None if sym else torch.zeros(n, groups, dtype=torch.uint8), g_idx=g_idx,
                         bits=bits, group_size=group_size, sym=sym)
    packed = get_format(fmt_name).pack(qw, **options)
    return sum(t.numel() * t.element_size() for t in packed.values())


def solve(choices: Mapping[str, Sequence[Choice]], budget: int, states: int = 20000) -> dict[str, Choice]:
    """The choice per layer with the least total loss whose total ``nbytes`` is at most
    ``budget``. Sizes are counted in units of ``max(1, budget // states)`` bytes, each
    rounded up (so the budget always holds): exact when the unit is one byte, and at most
    ``states`` sizes on the front otherwise. Ties go to the smaller size.

    Raises ``UserInputError`` when even the smallest choices exceed the budget."""
    names = list(choices)
    smallest = sum(min(c.nbytes for c in choices[n]) for n in names)
    if smallest > budget:
        raise UserInputError(f"the size budget ({budget} bytes) is below the smallest setting of every layer "
                             f"({smallest} bytes): raise --bits-budget")
    unit = max(1, budget // states)
    limit = budget // unit
    # the front: (size in units, loss) sorted by size with strictly decreasing loss;
    # parents[i][s] = (index in the previous front, choice index) of state s after layer i
    front: list[tuple[int, float]] = [(0, 0.0)]
    parents: list[list[tuple[int, int]]] = []
    for name in names:
        units = [-(-c.nbytes // unit) for c in choices[name]]
        candidates = sorted((size + u, loss + c.loss, k, j)
                            for k, (size, loss) in enumerate(front)
                            for j, (c, u) in enumerate(zip(choices[name], units)) if size + u <= limit)
        if not candidates:
            raise UserInputError(f"the size budget ({budget} bytes) is too small for every layer at its smallest "
                                 "setting once sizes are rounded: raise --bits-budget")
        front, links = [], []
        for size, loss, k, j in candidates:  # a state stays only if it beats every smaller one
            if not front or loss < front[-1][1]:
                front.append((size, loss))
                links.append((k, j))
        parents.append(links)
    state = min(range(len(front)), key=lambda s: (front[s][1], front[s][0]))
    picks: dict[str, Choice] = {}
    for name, links in zip(reversed(names), reversed(parents)):
        k, j = links[state]
        picks[name] = choices[name][j]
        state = k
    return {name: picks[name] for name in names}
