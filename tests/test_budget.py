"""The mixed-precision budget solver (``qtool.budget``): exact against brute force on small
cases, the budget always holds, and sizes are what the formats write."""

from __future__ import annotations

import itertools
import random

import pytest

from qtool.budget import Choice, layer_bytes, solve
from qtool.errors import UserInputError


def _brute_force(choices, budget):
    names = list(choices)
    best = None
    for picks in itertools.product(*(range(len(choices[n])) for n in names)):
        size = sum(choices[n][j].nbytes for n, j in zip(names, picks))
        loss = sum(choices[n][j].loss for n, j in zip(names, picks))
        if size <= budget and (best is None or loss < best):
            best = loss
    return best


@pytest.mark.parametrize("seed", range(40))
def test_solver_is_exact_on_small_cases(seed):
    rnd = random.Random(seed)
    choices = {}
    for i in range(rnd.randint(1, 7)):
        size = rnd.randint(10, 200)
        options = [Choice(4, size, rnd.uniform(0.5, 5.0))]  # the small setting: the largest loss
        for bits in (6, 8)[: rnd.randint(1, 2)]:
            options.append(Choice(bits, size * bits // 4 + rnd.randint(0, 9), rnd.uniform(0.0, options[-1].loss)))
        choices[f"layer{i}"] = options
    smallest = sum(o[0].nbytes for o in choices.values())
    largest = sum(max(c.nbytes for c in o) for o in choices.values())
    budget = rnd.randint(smallest, largest + 10)
    picks = solve(choices, budget)
    assert list(picks) == list(choices)
    assert sum(c.nbytes for c in picks.values()) <= budget
    assert sum(c.loss for c in picks.values()) == pytest.approx(_brute_force(choices, budget), abs=1e-12)


def test_coarse_units_keep_the_budget_and_stay_near_the_optimum():
    rnd = random.Random(7)
    choices = {f"l{i}": [Choice(4, s, rnd.uniform(1, 2)), Choice(8, 2 * s, 0.0)]
               for i, s in enumerate(rnd.randint(1000, 5000) for _ in range(12))}
    budget = int(1.4 * sum(o[0].nbytes for o in choices.values()))
    exact = solve(choices, budget)
    coarse = solve(choices, budget, states=50)  # 50 size units: rounding up costs a little
    assert sum(c.nbytes for c in coarse.values()) <= budget
    assert sum(c.loss for c in coarse.values()) >= sum(c.loss for c in exact.values())
    assert sum(c.loss for c in exact.values()) == pytest.approx(_brute_force(choices, budget))


def test_budget_below_the_smallest_settings_is_refused():
    choices = {"a": [Choice(4, 100, 1.0), Choice(8, 200, 0.0)]}
    with pytest.raises(UserInputError, match="raise --bits-budget"):
        solve(choices, 99)
    assert solve(choices, 199)["a"].setting == 4 and solve(choices, 200)["a"].setting == 8


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors", "awq"])
@pytest.mark.parametrize("bits", [4, 8])
def test_layer_bytes_count_what_the_format_packs(fmt, bits):
    """Codes at ``bits`` per weight, fp16 scales and (asym) zeros per group of 64."""
    from qtool.io import format_options
    from qtool.config import QuantizeConfig

    if fmt == "awq" and bits == 8:
        pytest.skip("AWQ's format is 4-bit only")
    n, k, g = 96, 576, 64
    cfg = QuantizeConfig(format=fmt, bits=bits, group_size=g, sym=False)
    got = layer_bytes(fmt, format_options(fmt, cfg), (n, k), bits, g, sym=False)
    codes, scales = n * k * bits // 8, n * (k // g) * 2
    assert codes + scales < got <= codes + scales + n * (k // g) * 4 + k * 4  # zeros (packed or not), g_idx
    assert layer_bytes(fmt, format_options(fmt, cfg), (n, 2 * k), bits, g, sym=False) > 1.9 * got
