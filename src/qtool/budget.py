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


SENSITIVITY_SAMPLES = 4  # calibration samples the per-layer KL is measured on


def _sizer(config, shapes: Mapping[str, tuple[int, int]]):
    """``nbytes(item, bits)``: the output format's bytes of the linears of ``item``."""
    from qtool.io import format_options

    options = format_options(config.format, config)
    sizes: dict[tuple, int] = {}

    def nbytes(item: Sequence[str], bits: int) -> int:
        total = 0
        for n in item:
            key = (shapes[n], bits)
            if key not in sizes:
                sizes[key] = layer_bytes(config.format, options, shapes[n], bits, config.group_size, config.symmetric,
                                         config.uses_act_order)
            total += sizes[key]
        return total

    return nbytes


def check_budget(config, shapes: Mapping[str, tuple[int, int]], spec=None):
    """``(weights, budget in bytes, nbytes(item, bits))`` of ``--bits-budget`` over the
    quantized linears of ``shapes``; refuses (before any work) a budget below every linear at ``config.bits``,
    and a mixture-of-experts ``spec``."""
    if spec is not None and spec.moe is not None:
        raise UserInputError("--bits-budget does not support mixture-of-experts models yet: drop it "
                             "(or quantize uniformly with --bits)")
    nbytes = _sizer(config, shapes)
    weights = sum(n * k for n, k in shapes.values())
    budget = int(config.bits_budget * weights / 8)
    floor = nbytes(list(shapes), config.bits)
    if floor > budget:
        raise UserInputError(f"--bits-budget {config.bits_budget} is below this model at {config.bits} bits in "
                             f"{config.format} ({8 * floor / weights:.3f} bits per weight with scales): raise it "
                             f"to at least {8 * floor / weights:.3f}")
    return weights, budget, nbytes


def choose_widths(model, spec, config, input_ids: torch.Tensor, quantized: Sequence[str],
                  progress=lambda event, **info: None):
    """``--bits-budget``: the config with ``layer_bits`` set, and the record of the choice.

    Items are the linears of a block that share one input (``spec.sequential``: q/k/v,
    gate/up, ...), which the serving engines fuse into one layer and which therefore get
    one width; every other quantized linear is an item of its own. Each item's loss is its
    measured sensitivity (``qtool.sensitivity``: the mean KL from the float model over the
    first ``SENSITIVITY_SAMPLES`` calibration samples, with only that item rounded to
    nearest at ``config.bits``); at the wider width (8 bits) the loss is taken as 0 (its
    KL is 1/20 or less of the 4-bit one, ``tests/test_sensitivity.py``), so the solver
    keeps at ``config.bits`` the items whose KL sums least. Sizes are the output format's
    bytes (``layer_bytes``); the budget is ``bits_budget * weights / 8`` bytes over all
    quantized linears."""
    from qtool.config import SUPPORTED_BITS
    from qtool.models import get_blocks
    from qtool.sensitivity import layer_sensitivity

    quantized = set(quantized)
    low, wide = config.bits, max(SUPPORTED_BITS)
    items: list[tuple[str, ...]] = []
    for i, _ in enumerate(get_blocks(model, spec)):
        prefix = f"{spec.blocks}.{i}."
        for group in spec.for_block(i).sequential:
            item = tuple(prefix + n for n in group if prefix + n in quantized)
            if item:
                items.append(item)
    items += [(n,) for n in sorted(quantized - {n for item in items for n in item})]
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in quantized}
    weights, budget, nbytes = check_budget(config, shapes, spec)
    ids = input_ids[:SENSITIVITY_SAMPLES]
    progress("eval", name=f"layer sensitivity ({len(ids)} x {ids.shape[1]} tokens)", total=len(items), unit="layer")
    kl = layer_sensitivity(model, spec, ids, (low,), config.group_size, config.symmetric, batch_size=1, names=items,
                           progress=lambda _name, done, total: progress("window", index=done - 1, total=total))
    choices = {item: [Choice(low, nbytes(item, low), kl[item][low]), Choice(wide, nbytes(item, wide), 0.0)]
               for item in items}
    picks = solve(choices, budget)
    layer_bits = tuple(sorted((n, wide) for item, c in picks.items() if c.setting == wide for n in item))
    used = sum(c.nbytes for c in picks.values())
    record = {
        "bits_budget": config.bits_budget,
        "bits_per_weight": round(8 * used / weights, 4),
        "bytes": used,
        "budget_bytes": budget,
        "widths": {str(b): sum(len(item) for item, c in picks.items() if c.setting == b) for b in (low, wide)},
        "sensitivity": {"measure": f"mean KL from the float model, one item at {low} bits (round to nearest)",
                        "samples": len(ids), "seqlen": int(ids.shape[1]),
                        "kl": {"+".join(item): round(kl[item][low], 8) for item in items}},
    }
    return config.replace(layer_bits=layer_bits), record
