"""Position probes on shapes beyond the reference vectors: codes that encode their own
coordinates, checked field by field against the spec's closed forms (scalar Python, not the
vectorised packers), plus exact unpack(pack(x)) for every registered format."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from pack_helpers import field, make_qw, unpack_like

from qtool.errors import UnsupportedError
from qtool.pack import FORMATS, awq, compressed_tensors, gptq, marlin

SHAPES = [(64, 16), (64, 48), (128, 272), (192, 256), (64, 128)]
GROUPS = [-1, 16, 32, 128]


def _cases():
    for (n, k), g, bits, sym, act in itertools.product(
        SHAPES, GROUPS, (4, 8), (True, False), (False, True)
    ):
        if g != -1 and (k % g or g == k and act) or (act and g == -1):
            continue
        yield n, k, g, bits, sym, act


CASES = list(_cases())


def _sample(*ranges: int, count: int = 300, seed: int = 0):
    """``count`` random index tuples (fixed seed) within ``ranges``, plus the corners."""
    rng = random.Random(seed)
    corners = [tuple(0 for _ in ranges), tuple(r - 1 for r in ranges)]
    return corners + [tuple(rng.randrange(r) for r in ranges) for _ in range(count)]


def _probe_qw(n, k, g, bits, sym, act):
    return make_qw(
        n, k, bits=bits, group_size=g, sym=sym, act_order=act, bias=(n == 128), seed=n + k
    )


def _packs(fmt, case) -> bool:
    try:
        fmt.pack(_probe_qw(*case))
    except UnsupportedError:
        return False
    return True


# (format, case) pairs whose layout holds the case; the others are refusals (tested below)
PACKABLE = [
    (name, case) for name in sorted(FORMATS) for case in CASES if _packs(FORMATS[name], case)
]


@pytest.mark.parametrize("name,case", PACKABLE, ids=lambda v: str(v))
def test_unpack_inverts_pack(name, case):
    fmt = FORMATS[name]
    qw = _probe_qw(*case)
    packed = fmt.pack(qw)
    for t in packed.values():
        assert t.is_contiguous()
    got = unpack_like(fmt, packed, qw)
    assert got.equal(qw)
    assert torch.equal(got.dequantize(), qw.dequantize())


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_packs_some_probe_cases(name):
    assert sum(1 for fmt_name, _ in PACKABLE if fmt_name == name) >= 8


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(
    "n,k,g,act", [(64, 272, 16, True), (192, 48, -1, False), (128, 256, 32, False)]
)
def test_gptq_fields(n, k, g, act, bits, version):
    sym = version == 1  # v1 probes symmetric; v2 probes asymmetric zeros incl. 0
    qw = make_qw(n, k, bits=bits, group_size=g, sym=sym, act_order=act, seed=3)
    t = gptq.pack(qw, version=version)
    per = 32 // bits
    zeros = qw.zeros_or_midpoint()
    for r, j in _sample(k // per, n):
        for i in range(per):
            assert field(t["qweight"][r, j], i, bits) == qw.codes[j, per * r + i]
    for gr, c in _sample(qw.num_groups, n // per):
        for i in range(per):
            assert field(t["qzeros"][gr, c], i, bits) == int(zeros[per * c + i, gr]) - int(
                version == 1
            )
    assert torch.equal(t["g_idx"], qw.group_index().int())
    assert t["scales"][0, n - 1] == qw.scales[n - 1, 0]
    if sym:
        word = 0x77777777 if bits == 4 else 0x7F7F7F7F
        assert bool((t["qzeros"].long() & 0xFFFFFFFF == word).all())


@pytest.mark.parametrize("n,k,g", [(64, 16, -1), (128, 48, 16), (192, 272, 16)])
def test_awq_fields(n, k, g):
    if g == -1:
        g = k
    qw = make_qw(n, k, group_size=g, sym=False, seed=4)
    t = awq.pack(qw)
    for c, w in _sample(k, n // 8):
        for p in range(8):
            assert field(t["qweight"][c, w], p) == qw.codes[8 * w + awq.ORDER[p], c]
    for gr, w in _sample(qw.num_groups, n // 8):
        for p in range(8):
            assert field(t["qzeros"][gr, w], p) == qw.zeros[8 * w + awq.ORDER[p], gr]


_A = (0, 8, 0, 8, 1, 9, 1, 9)  # spec §2.2 table: row-in-tile offset per nibble (+2t)
_B = (0, 0, 8, 8, 0, 0, 8, 8)  # column-in-tile offset per nibble (+col)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize(
    "n,k,g,act",
    [(64, 16, -1, False), (128, 48, 16, False), (192, 272, 16, True), (64, 128, 128, False)],
)
def test_marlin_fields(n, k, g, act, sym):
    qw = make_qw(n, k, group_size=g, sym=sym, act_order=act, seed=5)
    t = marlin.pack(qw)
    order = torch.argsort(qw.g_idx, stable=True) if act else torch.arange(k)
    q = qw.codes.T[order]  # [k, n] in kernel row order
    for r, c, i, j in _sample(k // 16, n // 64, 32, 4):
        word = t["B"][r, 128 * c + 4 * i + j]
        tt, col = i % 4, i // 4
        for p in range(8):
            assert field(word, p) == q[16 * r + 2 * tt + _A[p], 64 * c + 16 * j + col + _B[p]]
    S = qw.scales.T  # [G, n] logical
    off = (0, 1, 8, 9, 16, 17, 24, 25)
    for gr, col in _sample(qw.num_groups, n):
        if qw.num_groups > 1:  # grouped: s[64c + 8i + j] = S[64c + i + 8j]
            c, i, j = col // 64, (col % 64) // 8, col % 8
            assert t["s"][gr, col] == S[gr, 64 * c + i + 8 * j]
        else:  # single: s[32c + 8i + m] = S[32c + 2i + off[m]]
            c, i, m = col // 32, (col % 32) // 8, col % 8
            assert t["s"][gr, col] == S[gr, 32 * c + 2 * i + off[m]]
    if not sym:
        Z = qw.zeros.T  # [G, n]
        for gr, w in _sample(qw.num_groups, n // 8):
            for p in range(8):
                col = 8 * w + marlin.ORDER[p]  # position after the grouped transpose
                c, i, j = col // 64, (col % 64) // 8, col % 8
                assert field(t["zp"][gr, w], p) == Z[gr, 64 * c + i + 8 * j]
    else:
        assert "zp" not in t
    if act:
        assert torch.equal(t["perm"].long(), order)
        assert bool((t["g_idx"][1:] >= t["g_idx"][:-1]).all())
    else:
        assert "perm" not in t and "g_idx" not in t


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k,g", [(64, 272, 16), (192, 48, -1)])
def test_compressed_tensors_fields(n, k, g, bits):
    qw = make_qw(n, k, bits=bits, group_size=g, sym=False, seed=6)
    t = compressed_tensors.pack(qw)
    per = 32 // bits
    for j, w in _sample(n, k // per):
        for i in range(per):
            assert field(t["weight_packed"][j, w], i, bits) == qw.codes[j, per * w + i]
    for r, gr in _sample(n // per, qw.num_groups):
        for i in range(per):
            assert field(t["weight_zero_point"][r, gr], i, bits) == qw.zeros[per * r + i, gr]
    assert t["weight_shape"].tolist() == [n, k] and t["weight_shape"].dtype == torch.int64
    assert torch.equal(t["weight_scale"], qw.scales)
    assert "weight_g_idx" not in t  # compressed-tensors >= 0.20 reads no g_idx: act-order layers are refused


def test_layout_refusals_name_the_limit():
    with pytest.raises(UnsupportedError, match="multiple of 64"):
        marlin.pack(make_qw(96, 128, group_size=-1))
    with pytest.raises(UnsupportedError, match="multiple of 16"):
        marlin.pack(make_qw(64, 40, group_size=-1))
    with pytest.raises(UnsupportedError, match="multiple of 8"):
        awq.pack(make_qw(60, 128, group_size=64, sym=False))
    with pytest.raises(UnsupportedError, match="zero points"):
        awq.pack(make_qw(64, 128, group_size=64, sym=True))
    with pytest.raises(UnsupportedError, match="act-order"):
        awq.pack(make_qw(64, 128, group_size=64, sym=False, act_order=True))
    with pytest.raises(UnsupportedError, match="dynamic act-order"):
        compressed_tensors.pack(make_qw(64, 128, group_size=64, act_order=True))
    with pytest.raises(UnsupportedError, match="multiple of 8"):
        gptq.pack(make_qw(64, 36, group_size=-1))
