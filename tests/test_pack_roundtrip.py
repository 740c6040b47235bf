"""Format-to-format conversion: for every ordered pair of registered formats that can both
hold a weight, pack A -> unpack -> pack B -> unpack -> pack A is byte-identical and the
dequantized weights are identical."""

from __future__ import annotations

import itertools

import pytest
import torch
from pack_helpers import make_qw, tensors_identical, unpack_like

from qtool.pack import FORMATS

WEIGHTS = {
    "sym-g128": dict(group_size=128, sym=True),
    "sym-g-1": dict(group_size=-1, sym=True),
    "asym-g128": dict(group_size=128, sym=False),
    "asym-g64-bias": dict(group_size=64, sym=False, bias=True),
    "sym-g64-act": dict(group_size=64, sym=True, act_order=True),
    "asym-g32-act": dict(group_size=32, sym=False, act_order=True),
    "sym8-g128": dict(bits=8, group_size=128, sym=True),
    "asym8-g-1": dict(bits=8, group_size=-1, sym=False),
}
N, K = 128, 256


def _holds(fmt, qw) -> bool:
    n, k = qw.shape
    return fmt.check_layer(n, k, qw.bits, qw.group_size, qw.sym, qw.g_idx is not None) is None


PAIRS = [
    (w, a, b)
    for w, (a, b) in itertools.product(WEIGHTS, itertools.permutations(sorted(FORMATS), 2))
    if _holds(FORMATS[a], make_qw(N, K, **WEIGHTS[w]))
    and _holds(FORMATS[b], make_qw(N, K, **WEIGHTS[w]))
]


@pytest.mark.parametrize("weight,a,b", PAIRS)
def test_convert_a_b_a_is_byte_identical(weight, a, b):
    fa, fb = FORMATS[a], FORMATS[b]
    qw = make_qw(N, K, probe=False, seed=11, **WEIGHTS[weight])
    packed_a = fa.pack(qw)
    via_a = unpack_like(fa, packed_a, qw)
    packed_b = fb.pack(via_a)
    via_b = unpack_like(fb, packed_b, qw)
    again_a = fa.pack(via_b)
    assert tensors_identical(packed_a, again_a)
    assert via_b.equal(qw)
    assert torch.equal(via_b.dequantize(), qw.dequantize())


def test_round_trips_cover_every_format_and_variant():
    names = {a for _, a, _ in PAIRS}
    assert names == set(FORMATS)
    covered = {w for w, _, _ in PAIRS}
    assert {"sym-g128", "asym-g128", "sym-g64-act", "sym8-g128"} <= covered
    # the act-order pairs include the marlin row permutation
    assert any(w == "sym-g64-act" and "marlin" in (a, b) for w, a, b in PAIRS)
    assert any(w.startswith("asym") and "awq" in (a, b) and "marlin" in (a, b) for w, a, b in PAIRS)
