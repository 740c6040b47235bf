"""Dequant-matmul kernels (qtool.kernels) against the torch reference and the format vectors.

Without a CUDA device the Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1
is set below before triton or the kernel modules are imported (and the kernel modules are
reloaded if someone imported them earlier without it). With a CUDA device (and no
TRITON_INTERPRET=1 in the environment) the same tests run the compiled kernels on the GPU.

Oracles, all independent of the code under test:
* the reference vectors' ``w_deq`` (X = identity rows gives exactly W),
* weights built here from integer codes, scales and zeros with our own small packers
  (the Marlin packer uses the spec's table-driven recipe, not the closed form the
  reference and the kernel use).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch

USE_CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if not USE_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton", reason="triton is not installed")

from safetensors.torch import load_file

from qtool.errors import FormatError, UnsupportedError
from qtool.kernels import PackedLinear, available_kernels, quant_matmul
from qtool.kernels import reference as R
from qtool.kernels.check import check_layers


def _interpreted_modules():
    """The kernel modules, reloaded if an earlier import compiled them for a GPU."""
    from qtool.kernels import _device, gptq_triton, marlin_triton

    if not USE_CUDA and type(gptq_triton._gptq_kernel).__name__ != "InterpretedFunction":
        for mod in (_device, gptq_triton, marlin_triton):
            importlib.reload(mod)
    return gptq_triton, marlin_triton


gptq_triton, marlin_triton = _interpreted_modules()

DEVICE = "cuda" if USE_CUDA else "cpu"
REFVECTORS = Path(__file__).resolve().parents[2] / "shared" / "refvectors"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# worst |y - y_ref| relative to max|y_ref|
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# A fixed launch config: on GPU it keeps the tests off the autotuner; in the interpreter
# it is the default one.
CFG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 1})


def cfg(bn=64, bk=64, split_k=1):
    return triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split_k})


def assert_close(y, ref, dtype):
    assert y.dtype == ref.dtype == dtype and y.shape == ref.shape
    y, ref = y.float().cpu(), ref.float().cpu()
    assert torch.isfinite(y).all()
    err = (y - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]} ({dtype})"


# ------------------------------------------------------------------ test-side packers


def pack_along_k(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [k, n] -> int32 [k/per, n]: field i of word r = row per*r + i."""
    per = 32 // bits
    c = codes.to(torch.int64).reshape(-1, per, codes.shape[1])
    words = sum(c[:, i] << (bits * i) for i in range(per))
    return (words - ((words >> 31) << 32)).to(torch.int32)  # two's complement wrap


def pack_along_n(values: torch.Tensor, bits: int) -> torch.Tensor:
    """values [rows, n] -> int32 [rows, n/per]: field i of word c = column per*c + i."""
    return pack_along_k(values.T.contiguous(), bits).T.contiguous()


def _perms():
    return load_file(REFVECTORS / "marlin" / "perms.safetensors")


def marlin_pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Spec §2.2 recipe: 16x16 tiles, gather with ``weight_perm`` per 1024 chunk, pack 8."""
    k, n = codes.shape
    t = (
        codes.to(torch.int64)
        .reshape(k // 16, 16, n // 16, 16)
        .permute(0, 2, 1, 3)
        .reshape(k // 16, n * 16)
    )
    perm = _perms()["weight_perm"].long()
    t = t.reshape(k // 16, -1, 1024)[:, :, perm].reshape(k // 16, n * 16)
    return pack_along_n(t, 4)


def marlin_pack_scales(S: torch.Tensor, grouped: bool) -> torch.Tensor:
    perm = _perms()["scale_perm" if grouped else "scale_perm_single"].long()
    return S.reshape(S.shape[0], -1, perm.numel())[:, :, perm].reshape(S.shape)


def marlin_pack_zeros(Z: torch.Tensor) -> torch.Tensor:
    z1 = marlin_pack_scales(Z, grouped=True)
    order = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])
    z2 = z1.reshape(Z.shape[0], -1, 8)[:, :, order].reshape(Z.shape)
    return pack_along_n(z2, 4)


def random_layer(k, n, group_size, *, seed, sym=True, bits=4, act_order=False, zero_min=0):
    """Integer codes [k, n], scales [G, n] fp16, zeros [G, n], g_idx [k] and the exact
    float32 weight they define (README §1)."""
    gen = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    G = 1 if group_size == -1 else -(-k // group_size)
    codes = torch.randint(0, maxq + 1, (k, n), generator=gen)
    scales = (0.002 + 0.018 * torch.rand(G, n, generator=gen)).half()
    zeros = (
        torch.full((G, n), 2 ** (bits - 1))
        if sym
        else torch.randint(zero_min, maxq + 1, (G, n), generator=gen)
    )
    g_idx = R.contiguous_groups(k, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    w = (codes - zeros[g_idx]).float() * scales.float()[g_idx]
    return {
        "codes": codes,
        "scales": scales,
        "zeros": zeros,
        "g_idx": g_idx.to(torch.int32),
        "w": w,
    }


def gptq_tensors(layer, *, bits=4, version=1, with_zeros=True):
    zeros = layer["zeros"] - (1 if version == 1 else 0)
    return {
        "qweight": pack_along_k(layer["codes"], bits),
        "qzeros": pack_along_n(zeros, bits) if with_zeros else None,
        "scales": layer["scales"],
        "g_idx": layer["g_idx"],
    }


def marlin_tensors(layer, k, group_size, *, zero_point=False, act_order=False):
    codes, g_idx = layer["codes"], layer["g_idx"]
    out = {}
    if act_order:
        perm = torch.argsort(g_idx, stable=True)
        codes, g_idx = codes[perm], g_idx[perm]
        out.update(perm=perm.to(torch.int32), g_idx=g_idx.to(torch.int32))
    grouped = group_size != -1 and group_size < k
    out.update(B=marlin_pack_codes(codes), s=marlin_pack_scales(layer["scales"], grouped))
    if zero_point:
        out["zp"] = marlin_pack_zeros(layer["zeros"])
    return out


def to_dev(d):
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in d.items()}


def rand_x(m, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen).to(dtype=dtype, device=DEVICE)


# ------------------------------------------------------------------------- cases

# name: (k, n, group_size, sym, version, act_order, bits, qzeros stored, bias)
GPTQ_CASES = {
    "sym_v1_g64": (128, 40, 64, True, 1, False, 4, True, False),  # tile-uniform groups
    "asym_v2_g32_partial": (
        200,
        96,
        32,
        False,
        2,
        False,
        4,
        True,
        True,
    ),  # per-row, G=7 (last partial)
    "actorder_sym_v1_g32": (72, 64, 32, True, 1, True, 4, True, False),  # non-monotone g_idx
    "perchannel_asym_v2": (72, 24, -1, False, 2, False, 4, True, True),  # one group, masked K tail
    "asym_v1_minimal": (64, 8, 64, False, 1, False, 4, True, False),  # v1 with zeros >= 1
    "no_qzeros_perchannel": (64, 16, -1, True, 1, False, 4, False, False),  # implicit midpoint
    "int8_sym_v1_g64": (128, 16, 64, True, 1, False, 8, True, False),
}

# name: (k, n, group_size, zero_point, act_order, bias)
MARLIN_CASES = {
    "sym_g32": (64, 64, 32, False, False, False),  # per-row groups (g < BLOCK_K)
    "sym_g64": (128, 128, 64, False, False, True),  # tile-uniform groups
    "sym_perchannel": (48, 64, -1, False, False, False),  # single scale perm, masked K tail
    "sym_g_eq_k": (64, 192, 64, False, False, False),  # one group: single scale perm
    "zp_g64": (128, 64, 64, True, False, True),
    "zp_perchannel": (64, 128, -1, True, False, False),  # single scale perm, grouped zp perm
    "actorder_g32": (128, 64, 32, False, True, False),
}


def build_gptq(name):
    k, n, g, sym, version, act, bits, with_zeros, bias = GPTQ_CASES[name]
    layer = random_layer(
        k,
        n,
        g,
        seed=zlib.crc32(name.encode()) % 1000,
        sym=sym,
        bits=bits,
        act_order=act,
        zero_min=1 if version == 1 else 0,
    )
    t = gptq_tensors(layer, bits=bits, version=version, with_zeros=with_zeros)
    b = torch.randn(n, generator=torch.Generator().manual_seed(7)).half() if bias else None
    return (
        layer,
        to_dev(t),
        {"bits": bits, "version": version, "group_size": g},
        None if b is None else b.to(DEVICE),
    )


def build_marlin(name):
    k, n, g, zp, act, bias = MARLIN_CASES[name]
    layer = random_layer(k, n, g, seed=zlib.crc32(name.encode()) % 1000, sym=not zp, act_order=act)
    t = marlin_tensors(layer, k, g, zero_point=zp, act_order=act)
    b = torch.randn(n, generator=torch.Generator().manual_seed(7)).half() if bias else None
    return layer, to_dev(t), {"k": k, "n": n, "group_size": g}, None if b is None else b.to(DEVICE)


def gptq_ref(x, t, meta, bias):
    return R.gptq_matmul_ref(
        x,
        t["qweight"],
        t["qzeros"],
        t["scales"],
        t["g_idx"],
        bits=meta["bits"],
        version=meta["version"],
        bias=bias,
    )


def marlin_ref(x, t, meta, bias):
    return R.marlin_matmul_ref(
        x,
        t["B"],
        t["s"],
        zp=t.get("zp"),
        perm=t.get("perm"),
        g_idx=t.get("g_idx"),
        bias=bias,
        **meta,
    )


# ------------------------------------------------------------- interpreter is real


def test_kernels_use_the_interpreter_without_cuda():
    kind = type(gptq_triton._gptq_kernel).__name__, type(marlin_triton._marlin_kernel).__name__
    if USE_CUDA:
        assert kind == ("JITFunction", "JITFunction")
    else:
        assert kind == ("InterpretedFunction", "InterpretedFunction")
        assert "triton" in available_kernels()


# ------------------------------------------------------------------- the reference


def _refvector_files(sub):
    return sorted((REFVECTORS / sub).glob("case*.safetensors"))


def _group_size(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return int(f.metadata()["group_size"])


@pytest.mark.parametrize("path", _refvector_files("gptq"), ids=lambda p: p.stem)
def test_reference_gptq_refvectors_exact(path):
    t = load_file(path)
    k = t["w_deq"].shape[0]
    eye = torch.eye(k)
    y = R.gptq_matmul_ref(eye, t["qweight"], t["qzeros_v2"], t["scales"], t["g_idx"], version=2)
    assert torch.equal(y.half(), t["w_deq"])
    y1 = R.gptq_matmul_ref(eye, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], version=1)
    if "asym" in path.stem:
        # spec §3.2: a zero of 0 has no v1 field; the stored words are unreadable nibble-wise
        assert not torch.equal(y1.half(), t["w_deq"])
    else:
        assert torch.equal(y1.half(), t["w_deq"])
    if "marlin_B" in t:  # vLLM's GPTQ-Marlin repack of the same layer
        y = R.marlin_matmul_ref(
            eye,
            t["marlin_B"],
            t["marlin_s"],
            k=k,
            n=t["w_deq"].shape[1],
            group_size=_group_size(path),
            perm=t.get("marlin_perm"),
            g_idx=t.get("marlin_g_idx"),
        )
        assert torch.equal(y.half(), t["w_deq"])


@pytest.mark.parametrize(
    "path", _refvector_files("marlin") + _refvector_files("awq"), ids=lambda p: p.stem
)
def test_reference_marlin_refvectors_exact(path):
    t = load_file(path)
    k, n = t["w_deq"].shape
    B, s, zp = (
        (t["marlin_B"], t["marlin_s"], t["marlin_zp"])
        if "marlin_B" in t
        else (t["B"], t["s"], t.get("zp"))
    )
    y = R.marlin_matmul_ref(torch.eye(k), B, s, k=k, n=n, group_size=_group_size(path), zp=zp)
    assert torch.equal(y.half(), t["w_deq"])


def test_reference_scale_perms_match_tables():
    p = _perms()
    assert R.marlin_scale_perm(True) == p["scale_perm"].tolist()
    assert R.marlin_scale_perm(False) == p["scale_perm_single"].tolist()


@pytest.mark.parametrize("name", GPTQ_CASES)
def test_reference_gptq_equals_direct_formula(name):
    layer, t, meta, _ = build_gptq(name)
    x = rand_x(5, layer["w"].shape[0], torch.float32)
    assert torch.equal(gptq_ref(x, t, meta, None), x @ layer["w"].to(DEVICE))


@pytest.mark.parametrize("name", MARLIN_CASES)
def test_reference_marlin_equals_direct_formula(name):
    layer, t, meta, _ = build_marlin(name)
    x = rand_x(5, meta["k"], torch.float32)
    y, expected = marlin_ref(x, t, meta, None), x @ layer["w"].to(DEVICE)
    if MARLIN_CASES[name][4]:  # act-order sums the k terms in perm order: same terms, other order
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(y, expected)


# --------------------------------------------------------------------- the kernels


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("name", GPTQ_CASES)
def test_gptq_kernel_matches_reference(name, m, dtype):
    _, t, meta, bias = build_gptq(name)
    x = rand_x(m, t["qweight"].shape[0] * 32 // meta["bits"], dtype, seed=m)
    # a stored g_idx always takes the per-row path; None (trivial groups) the tile-uniform
    # one when BLOCK_K divides group_size
    g_idx = t["g_idx"] if GPTQ_CASES[name][5] or m == 3 else None
    y = gptq_triton.gptq_matmul(
        x,
        t["qweight"],
        t["qzeros"],
        t["scales"],
        g_idx,
        group_size=meta["group_size"],
        bits=meta["bits"],
        version=meta["version"],
        bias=bias,
        config=CFG,
    )
    assert_close(y, gptq_ref(x, t, meta, bias), dtype)


@pytest.mark.parametrize("name", GPTQ_CASES)
def test_gptq_kernel_split_k_and_contiguous_groups(name):
    _, t, meta, bias = build_gptq(name)
    x = rand_x(3, t["qweight"].shape[0] * 32 // meta["bits"], torch.float16)
    g_idx = t["g_idx"] if GPTQ_CASES[name][5] else None  # trivial g_idx -> group_size path
    y = gptq_triton.gptq_matmul(
        x,
        t["qweight"],
        t["qzeros"],
        t["scales"],
        g_idx,
        group_size=meta["group_size"],
        bits=meta["bits"],
        version=meta["version"],
        bias=bias,
        config=cfg(bn=32, bk=32, split_k=3),
    )
    assert_close(y, gptq_ref(x, t, meta, bias), torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("name", MARLIN_CASES)
def test_marlin_kernel_matches_reference(name, m, dtype):
    _, t, meta, bias = build_marlin(name)
    x = rand_x(m, meta["k"], dtype, seed=m)
    y = marlin_triton.marlin_matmul(
        x,
        t["B"],
        t["s"],
        zp=t.get("zp"),
        perm=t.get("perm"),
        g_idx=t.get("g_idx"),
        bias=bias,
        config=CFG,
        **meta,
    )
    assert_close(y, marlin_ref(x, t, meta, bias), dtype)


@pytest.mark.parametrize("bn,bk,split_k", [(32, 32, 3), (128, 16, 2), (64, 128, 1)])
@pytest.mark.parametrize("name", ["sym_g_eq_k", "zp_g64", "actorder_g32"])
def test_marlin_kernel_other_tiles_and_split_k(name, bn, bk, split_k):
    """Tiles narrower / wider than one 64-column chunk, 16-row K tiles, split-K; act-order
    without the sorted g_idx (groups from row // group_size)."""
    _, t, meta, bias = build_marlin(name)
    t.pop("g_idx", None)
    x = rand_x(3, meta["k"], torch.float16)
    y = marlin_triton.marlin_matmul(
        x,
        t["B"],
        t["s"],
        zp=t.get("zp"),
        perm=t.get("perm"),
        bias=bias,
        config=cfg(bn, bk, split_k),
        **meta,
    )
    assert_close(y, marlin_ref(x, t, meta, bias), torch.float16)


@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("path", _refvector_files("gptq"), ids=lambda p: p.stem)
def test_gptq_kernel_refvectors_exact(path, split_k):
    """X = identity rows (every residue mod 16, several groups): Y equals w_deq bit for bit,
    in float32 and (w_deq being fp16) in float16."""
    t = to_dev(load_file(path))
    k = t["w_deq"].shape[0]
    rows = torch.arange(0, k, 15, device=DEVICE)
    for dtype in (torch.float32, torch.float16):
        x = torch.eye(k, dtype=dtype, device=DEVICE)[rows]
        y = gptq_triton.gptq_matmul(
            x,
            t["qweight"],
            t["qzeros_v2"],
            t["scales"],
            t["g_idx"],
            version=2,
            config=cfg(split_k=split_k),
        )
        assert torch.equal(y.half(), t["w_deq"][rows])


@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize(
    "path", _refvector_files("marlin") + _refvector_files("awq"), ids=lambda p: p.stem
)
def test_marlin_kernel_refvectors_exact(path, split_k):
    t = to_dev(load_file(path))
    k, n = t["w_deq"].shape
    B, s, zp = (
        (t["marlin_B"], t["marlin_s"], t["marlin_zp"])
        if "marlin_B" in t
        else (t["B"], t["s"], t.get("zp"))
    )
    rows = torch.arange(0, k, 15, device=DEVICE)
    for dtype in (torch.float32, torch.float16):
        x = torch.eye(k, dtype=dtype, device=DEVICE)[rows]
        y = marlin_triton.marlin_matmul(
            x, B, s, k=k, n=n, group_size=_group_size(path), zp=zp, config=cfg(split_k=split_k)
        )
        assert torch.equal(y.half(), t["w_deq"][rows])


def test_marlin_kernel_actorder_refvector_exact():
    path = REFVECTORS / "gptq" / "case_sym_g128_descact_true.safetensors"
    t = to_dev(load_file(path))
    k, n = t["w_deq"].shape
    rows = torch.arange(0, k, 15, device=DEVICE)
    x = torch.eye(k, device=DEVICE)[rows]
    y = marlin_triton.marlin_matmul(
        x,
        t["marlin_B"],
        t["marlin_s"],
        k=k,
        n=n,
        group_size=128,
        perm=t["marlin_perm"],
        g_idx=t["marlin_g_idx"],
        config=CFG,
    )
    assert torch.equal(y.half(), t["w_deq"][rows])


def test_kernels_keep_leading_dims_and_empty_batch():
    _, t, meta, _ = build_gptq("sym_v1_g64")
    x = rand_x(6, 128, torch.float16).reshape(2, 3, 128)
    y = gptq_triton.gptq_matmul(
        x, t["qweight"], t["qzeros"], t["scales"], None, group_size=64, config=CFG
    )
    assert y.shape == (2, 3, 40)
    assert_close(y, gptq_ref(x, t, meta, None), torch.float16)
    empty = gptq_triton.gptq_matmul(
        x[:0], t["qweight"], t["qzeros"], t["scales"], None, group_size=64
    )
    assert empty.shape == (0, 3, 40)


# -------------------------------------------------------------------- validation


def test_gptq_validation_errors_name_the_constraint():
    _, t, _meta, _ = build_gptq("sym_v1_g64")
    x = rand_x(2, 128, torch.float16)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 128\]"):
        gptq_triton.gptq_matmul(x[:, :64], t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
    with pytest.raises(ValueError, match="scales has 2 groups: pass g_idx or group_size"):
        gptq_triton.gptq_matmul(x, t["qweight"], t["qzeros"], t["scales"], None)
    with pytest.raises(ValueError, match="qzeros must have shape"):
        gptq_triton.gptq_matmul(x, t["qweight"], t["qzeros"][:1], t["scales"], t["g_idx"])
    with pytest.raises(ValueError, match="x must be float16, bfloat16 or float32"):
        gptq_triton.gptq_matmul(x.double(), t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
    with pytest.raises(UnsupportedError, match="bits=3"):
        gptq_triton.gptq_matmul(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=3)


def test_marlin_validation_errors_name_the_constraint():
    _, t, _meta, _ = build_marlin("sym_g64")
    x = rand_x(2, 128, torch.float16)
    with pytest.raises(ValueError, match="n=96 must be a positive multiple of 64"):
        marlin_triton.marlin_matmul(x, t["B"], t["s"], k=128, n=96, group_size=64)
    with pytest.raises(ValueError, match=r"s must have shape \[1, 128\]"):
        marlin_triton.marlin_matmul(x, t["B"], t["s"], k=128, n=128, group_size=-1)
    with pytest.raises(UnsupportedError, match="4-bit only"):
        marlin_triton.marlin_matmul(x, t["B"], t["s"], k=128, n=128, group_size=64, bits=8)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    _, t, _meta, _ = build_gptq("sym_v1_g64")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 128)
    with pytest.raises(UnsupportedError, match="needs a CUDA tensor.*TRITON_INTERPRET=1"):
        gptq_triton.gptq_matmul(
            x, t["qweight"].cpu(), t["qzeros"].cpu(), t["scales"].cpu(), None, group_size=64
        )


# --------------------------------------------------------- dispatch, module, check


def test_quant_matmul_dispatch():
    _, t, meta, bias = build_gptq("asym_v2_g32_partial")
    t["bias"] = bias
    x = rand_x(3, 200, torch.float16)
    opts = {"bits": 4, "version": 2}
    ref = gptq_ref(x, t, meta, bias)
    expected_auto = "triton" if USE_CUDA else "torch"
    y_auto = quant_matmul(x, "gptq", t, **opts)
    y_torch = quant_matmul(x, "gptq", t, kernel="torch", **opts)
    y_triton = quant_matmul(x, "gptq", t, kernel="triton", **opts)
    assert torch.equal(y_torch, ref)
    if expected_auto == "torch":
        assert torch.equal(y_auto, ref)
    assert_close(y_triton, ref, torch.float16)
    with pytest.raises(UnsupportedError, match="format must be one of"):
        quant_matmul(x, "awq", t)
    with pytest.raises(ValueError, match="unexpected gptq tensors"):
        quant_matmul(x, "gptq", {**t, "B": t["qweight"]})


@pytest.mark.parametrize(
    "fmt,name",
    [
        ("gptq", "sym_v1_g64"),
        ("gptq", "actorder_sym_v1_g32"),
        ("marlin", "zp_g64"),
        ("marlin", "actorder_g32"),
    ],
)
def test_packed_linear(fmt, name):
    if fmt == "gptq":
        _, t, meta, bias = build_gptq(name)
        meta = dict(meta)
        ref = lambda x: gptq_ref(x, t, meta, bias)
    else:
        _, t, meta, bias = build_marlin(name)
        meta = {"group_size": meta["group_size"]}
        ref = lambda x: marlin_ref(
            x, t, {"k": t["B"].shape[0] * 16, "n": t["B"].shape[1] // 2, **meta}, bias
        )
    tensors = {k: v for k, v in t.items() if v is not None}
    if bias is not None:
        tensors["bias"] = bias
    layer = PackedLinear(fmt, tensors, kernel="triton", **meta)
    # a trivial g_idx (GPTQ always stores one; Marlin's sorted one) is dropped, and act-order
    # GPTQ rows are sorted by group with a perm: no g_idx reaches the kernel
    sorted_rows = "actorder" in name
    expected = (set(tensors) - {"g_idx"}) | ({"perm"} if sorted_rows else set())
    assert set(layer.state_dict()) == set(layer.packed_tensors()) == expected
    x = rand_x(4, layer.in_features, torch.float16).reshape(2, 2, -1)
    assert_close(layer(x), ref(x), torch.float16)


def test_packed_linear_rejects_bad_layout():
    _, t, _meta, _ = build_gptq("sym_v1_g64")
    with pytest.raises(FormatError, match="do not match the gptq layout"):
        PackedLinear("gptq", {**t, "scales": t["scales"][:, :8]}, group_size=64)


def test_check_layers():
    _, tg, mg, _ = build_gptq("actorder_sym_v1_g32")
    _, tm, _, _ = build_marlin("zp_g64")
    bad = {**tm, "s": tm["s"].clone()}
    bad["s"][0, 0] = float("nan")
    layers = {
        "a.q_proj": ("gptq", {k: v for k, v in tg.items() if v is not None}, mg),
        "a.k_proj": ("marlin", tm, {"group_size": 64}),
        "a.v_proj": ("marlin", bad, {"group_size": 64}),
        "a.o_proj": ("marlin", {**tm, "s": tm["s"][:1]}, {"group_size": 64}),
    }
    res = check_layers(layers, kernel="triton", seed=1)
    assert [r.name for r in res] == list(layers)
    assert [r.ok for r in res] == [True, True, False, False]
    assert (
        res[0].worst_rel_error <= 1e-4
        and "non-finite" in res[2].error
        and "s must have shape" in res[3].error
    )
    sampled = check_layers(layers, kernel="torch", sample=2, seed=3)
    # the torch kernel runs the loaded layout (act-order rows sorted): equal up to fp32 order
    assert len(sampled) == 2 and all(
        r.worst_rel_error <= 1e-6 or r.worst_rel_error == float("inf") for r in sampled
    )


@pytest.mark.parametrize(
    "fmt,sym,act_order,options",
    [
        ("gptq", True, True, {"version": 1}),
        ("gptq", False, False, {"version": 2}),
        ("marlin", True, True, {}),
        ("marlin", False, False, {}),
    ],
)
def test_packer_outputs_run_through_kernels(fmt, sym, act_order, options):
    """The format packers' output (when they exist) is what the kernels read."""
    packer = pytest.importorskip(f"qtool.pack.{fmt}")
    from qtool.qtensor import QuantizedWeight

    k, n, g = 128, 64, 32
    layer = random_layer(k, n, g, seed=5, sym=sym, act_order=act_order)
    qw = QuantizedWeight(
        codes=layer["codes"].T.contiguous().to(torch.uint8),
        scales=layer["scales"].T.contiguous(),
        zeros=None if sym else layer["zeros"].T.contiguous().to(torch.uint8),
        g_idx=layer["g_idx"] if act_order else None,
        bits=4,
        group_size=g,
        sym=sym,
    )
    tensors = to_dev(packer.pack(qw, **options))
    meta = {"group_size": g, **({"bits": 4, **options} if fmt == "gptq" else {})}
    x = rand_x(3, k, torch.float32)
    y = quant_matmul(x, fmt, tensors, kernel="triton", **meta)
    assert_close(y, x @ layer["w"].to(DEVICE), torch.float32)


# ------------------------------------------------------- strides and large offsets


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous tensor: 2-D transposed storage, 1-D stride 2."""
    out = t.T.contiguous().T if t.dim() == 2 else torch.stack([t, t], dim=1)[:, 0]
    assert torch.equal(out, t) and not out.is_contiguous()
    return out


GPTQ_STRIDED = [
    "x_transposed", "x_3d_permuted", "qweight", "qzeros", "scales", "g_idx", "perm", "bias"
]


@pytest.mark.parametrize("which", GPTQ_STRIDED)
def test_gptq_kernel_reads_non_contiguous_tensors(which):
    """Every tensor may arrive with any strides (a transposed or sliced view): the result
    equals the reference on contiguous copies. Before the wrappers made the packed tensors
    contiguous, each of those cases returned a wrong result without an error."""
    _, t, meta, bias = build_gptq("asym_v2_g32_partial")
    k = 200
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(3)).to(torch.int32)
    args = {**t, "perm": perm.to(DEVICE), "bias": bias}
    x = rand_x(6, k, torch.float32)
    ref = R.gptq_matmul_ref(x, **{n: args[n] for n in ("qweight", "qzeros", "scales", "g_idx")},
                            bits=4, version=2, bias=bias, perm=args["perm"]).reshape(2, 3, -1)
    x = x.reshape(2, 3, k)
    if which == "x_transposed":
        x = x.reshape(6, k).T.contiguous().T.reshape(2, 3, k)
        assert x.stride()[-1] != 1
    elif which == "x_3d_permuted":  # not viewable as [m, k]: the wrapper's reshape copies
        x = x.permute(1, 0, 2).contiguous().permute(1, 0, 2)
        assert not x.is_contiguous()
    else:
        args[which] = strided(args[which])
    y = gptq_triton.gptq_matmul(
        x, args["qweight"], args["qzeros"], args["scales"], args["g_idx"], bits=4, version=2,
        perm=args["perm"], bias=args["bias"], config=CFG,
    )
    assert_close(y, ref, torch.float32)


@pytest.mark.parametrize("which", ["x_transposed", "B", "s", "zp", "bias", "perm", "g_idx"])
def test_marlin_kernel_reads_non_contiguous_tensors(which):
    name = "actorder_g32" if which in ("perm", "g_idx") else "zp_g64"
    _, t, meta, bias = build_marlin(name)
    args = {**t, "bias": bias}
    x = rand_x(5, meta["k"], torch.float32)
    ref = marlin_ref(x, t, meta, bias)
    if which == "x_transposed":
        x = x.T.contiguous().T
    else:
        args[which] = strided(args[which])
    y = marlin_triton.marlin_matmul(
        x, args["B"], args["s"], zp=args.get("zp"), perm=args.get("perm"),
        g_idx=args.get("g_idx"), bias=args["bias"], config=CFG, **meta,
    )
    assert_close(y, ref, torch.float32)


def test_row_offsets_past_int32_are_addressed_in_int64(tmp_path):
    """``m * stride_xm`` and ``m * N`` beyond 2**31 elements. The activations are a view
    with a row stride of 2**30 + 64 into a sparse, memory-mapped 4 GB file (only the rows
    read touch memory), so rows 2 and 3 start past element 2**31; the output check stores
    tiles through ``store_out`` into a sparse [4, 2**30 + 64] file the same way. With int32
    offsets both wrapped and read or wrote wild addresses (a segfault here). The weights'
    row offsets (``K/per * N``) use the same int64 arithmetic but cannot be exercised on CPU:
    that needs a weight of 2**31 words that the kernel reads in full."""
    code = textwrap.dedent(f"""
        import sys, torch, triton, triton.language as tl
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_kernels as T
        from qtool.kernels._device import store_out

        def sparse(name, numel, dtype):
            path = {str(tmp_path)!r} + "/" + name
            with open(path, "wb") as f:
                f.truncate(numel * torch.empty(0, dtype=dtype).element_size())
            return torch.from_file(path, shared=True, size=numel, dtype=dtype)

        stride, m = 2**30 + 64, 4
        _, tg, mg, _ = T.build_gptq("sym_v1_g64")
        _, tm, mm, _ = T.build_marlin("sym_g64")
        x = sparse("x.bin", stride * (m - 1) + 128, torch.float16).as_strided((m, 128), (stride, 1))
        x.copy_(torch.randn(m, 128, generator=torch.Generator().manual_seed(0)).half())
        y = T.gptq_triton.gptq_matmul(x, tg["qweight"], tg["qzeros"], tg["scales"], None,
                                      group_size=64, config=T.CFG)
        T.assert_close(y, T.gptq_ref(x.clone(), tg, mg, None), torch.float16)
        y = T.marlin_triton.marlin_matmul(x, tm["B"], tm["s"], config=T.CFG, **mm)
        T.assert_close(y, T.marlin_ref(x.clone(), tm, mm, None), torch.float16)

        @triton.jit
        def store_tile(out_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
            offs_m = tl.arange(0, BLOCK_M)
            offs_n = tl.arange(0, BLOCK_N)
            acc = (offs_m[:, None] * BLOCK_N + offs_n[None, :]).to(tl.float32)
            store_out(out_ptr, acc, out_ptr, offs_m, offs_n, M, N, 0, False, False)

        out = sparse("out.bin", m * stride, torch.float32).view(m, stride)
        store_tile[(1,)](out, m, stride, BLOCK_M=m, BLOCK_N=16)
        expected = torch.arange(m * 16, dtype=torch.float32).view(m, 16)
        assert torch.equal(out[:, :16], expected), out[:, :16]
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.returncode, proc.stderr[-3000:])


# ------------------------------------------------- act-order: rows sorted by group


@pytest.fixture()
def launches(monkeypatch):
    """The constexprs of every kernel launch made while the test runs."""
    from qtool.kernels import _launch

    seen, real = [], _launch.launch

    def spy(plan, jit_fn, tiles, split, grid, args, constexprs):
        seen.append({**constexprs, **(plan.config.kwargs if plan.config else {})})
        return real(plan, jit_fn, tiles, split, grid, args, constexprs)

    monkeypatch.setattr(_launch, "launch", spy)
    return seen


def _assert_tile_path(launches, group_size):
    """Every launch had rows sorted (perm), no g_idx, and K tiles inside one group."""
    assert launches and all(
        not c["HAS_G_IDX"]
        and c["HAS_PERM"]
        and c["GROUP_SIZE"] == group_size
        and group_size % c.get("BLOCK_K", group_size) == 0  # autotuned on GPU: pruned so
        for c in launches
    ), launches


# (k, n, group_size, bits, version, sym): odd k with a partial last group, n not a power of 2
ACT_ORDER_GPTQ = {
    "sym_v1_4bit": (200, 72, 64, 4, 1, True),
    "asym_v2_8bit": (136, 40, 32, 8, 2, False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ACT_ORDER_GPTQ)
def test_act_order_gptq_runs_sorted_on_the_tile_path(case, dtype, launches):
    """An act-order GPTQ layer (random non-monotone g_idx, as GPTQ writes it: every group
    holds group_size channels) loaded through kernel_layout reaches the kernel with its rows
    sorted by group, a perm and no g_idx (tile-uniform scales), and equals the reference
    computed from the checkpoint's own tensors."""
    from qtool.kernels.layout import kernel_layout

    k, n, g, bits, version, sym = ACT_ORDER_GPTQ[case]
    layer = random_layer(k, n, g, seed=k + n, sym=sym, bits=bits, act_order=True,
                         zero_min=1 if version == 1 else 0)
    assert bool((layer["g_idx"][1:] < layer["g_idx"][:-1]).any())  # really non-monotone
    t = to_dev(gptq_tensors(layer, bits=bits, version=version))
    meta = {"bits": bits, "version": version, "group_size": g}
    loaded, loaded_meta = kernel_layout("gptq", t, meta)
    assert "g_idx" not in loaded and loaded["perm"].dtype == torch.int32
    assert loaded_meta["group_size"] == g
    x = rand_x(5, k, dtype)
    ref = gptq_ref(x, t, meta, None)
    y = gptq_triton.gptq_matmul(x, **loaded, **loaded_meta)
    assert_close(y, ref, dtype)
    _assert_tile_path(launches, g)
    assert_close(ref, (x.float() @ layer["w"].to(DEVICE)).to(dtype), dtype)  # the layer itself


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_act_order_marlin_runs_on_the_tile_path(dtype, launches):
    """Marlin stores act-order rows sorted, with perm and the sorted g_idx; loaded through
    kernel_layout, the sorted g_idx (= row // group_size) is dropped and the tile path runs."""
    from qtool.kernels.layout import kernel_layout

    k, n, g = 208, 128, 64
    layer = random_layer(k, n, g, seed=9, act_order=True)
    t = to_dev(marlin_tensors(layer, k, g, act_order=True))
    loaded, loaded_meta = kernel_layout("marlin", t, {"group_size": g})
    assert set(loaded) == {"B", "s", "perm"}
    x = rand_x(5, k, dtype)
    y = marlin_triton.marlin_matmul(x, loaded["B"], loaded["s"], perm=loaded["perm"], k=k, n=n,
                                    **loaded_meta)
    assert_close(y, marlin_ref(x, t, {"k": k, "n": n, "group_size": g}, None), dtype)
    _assert_tile_path(launches, g)


def test_unequal_groups_keep_the_g_idx_fallback(launches):
    """A g_idx whose groups are not all group_size channels (never written by GPTQ) cannot
    be sorted into contiguous groups: it stays, and the per-row path gives the exact result."""
    from qtool.kernels.layout import kernel_layout

    k, n, g = 128, 64, 32
    layer = random_layer(k, n, g, seed=4)
    gen = torch.Generator().manual_seed(4)
    g_idx = torch.cat([torch.arange(4), torch.randint(0, 4, (k - 4,), generator=gen)])
    g_idx = g_idx[torch.randperm(k, generator=gen)].to(torch.int32)
    t = to_dev({**gptq_tensors(layer), "g_idx": g_idx})
    meta = {"bits": 4, "version": 1, "group_size": g}
    loaded, loaded_meta = kernel_layout("gptq", t, meta)
    assert "perm" not in loaded and torch.equal(loaded["g_idx"], t["g_idx"])
    x = rand_x(3, k, torch.float32)
    y = quant_matmul(x, "gptq", loaded, kernel="triton", **loaded_meta)
    assert_close(y, gptq_ref(x, t, meta, None), torch.float32)
    assert [c["HAS_G_IDX"] for c in launches] == [True]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_layout_pack_along_k_inverts_unpack(bits):
    from qtool.kernels.layout import pack_along_k as pack

    codes = torch.randint(0, 2**bits, (64, 24), generator=torch.Generator().manual_seed(bits))
    words = pack(codes, bits)
    assert torch.equal(words, pack_along_k(codes, bits))  # the test's own packer
    assert torch.equal(R.unpack_along_k(words, bits), codes.to(torch.int32))


def test_check_and_packed_linear_run_act_order_without_g_idx(launches, monkeypatch):
    """qtool check (check_layers) and packed inference (PackedLinear) both hand act-order
    layers to the kernel sorted, with no g_idx; check compares against the checkpoint's
    own tensors, so a wrong relayout would fail it."""
    from qtool.kernels.layout import kernel_layout

    _, tg, mg, _ = build_gptq("actorder_sym_v1_g32")
    _, tm, _, _ = build_marlin("actorder_g32")
    layers = {
        "a.q_proj": ("gptq", {k: v for k, v in tg.items() if v is not None}, mg),
        "a.k_proj": ("marlin", tm, {"group_size": 32}),
    }
    res = check_layers(layers, kernel="triton", seed=2)
    assert all(r.ok and r.worst_rel_error <= 1e-5 for r in res), res
    _assert_tile_path(launches, 32)
    launches.clear()
    layer = PackedLinear("gptq", layers["a.q_proj"][1], kernel="triton", **mg)
    x = rand_x(3, 72, torch.float16)
    assert_close(layer(x), gptq_ref(x, tg, mg, None), torch.float16)
    _assert_tile_path(launches, 32)

    def forgets_perm(fmt, tensors, meta):  # a relayout bug: rows sorted, x not gathered
        t, m = kernel_layout(fmt, tensors, meta)
        return {k: v for k, v in t.items() if k != "perm"}, m

    monkeypatch.setattr("qtool.kernels.check.kernel_layout", forgets_perm)
    assert [r.ok for r in check_layers(layers, kernel="torch")] == [False, False]


# ----------------------------------------------------------- GPU compile (no GPU)


def test_kernels_compile_for_sm90():
    """Full Triton -> PTX -> cubin compile for sm_90 with the bundled ptxas (no GPU needed),
    one config per kernel and dequant path; fails on compile errors or register spills."""
    code = textwrap.dedent("""
        import warnings; warnings.filterwarnings("ignore")
        from qtool.kernels._aot import compile_variant
        from qtool.kernels._launch import SPLIT_K_CONFIGS, TILE_CONFIGS
        common = dict(HAS_BIAS=True, INPUT_PRECISION="tf32", DOT_F32=False)
        g = dict(BITS=4, GROUP_SIZE=128, ZERO_OFFSET=1, HAS_ZEROS=True, HAS_PERM=True, **common)
        m = dict(GROUP_SIZE=128, GROUPED_SCALES=True, HAS_ZEROS=True, HAS_PERM=True, **common)
        for kernel, base in (("gptq", g), ("marlin", m)):
            for gidx, atomic, config, act in ((False, True, SPLIT_K_CONFIGS[1], "float16"),
                                              (True, False, TILE_CONFIGS[-1], "bfloat16")):
                c = compile_variant(kernel, act, {**base, "HAS_G_IDX": gidx, "ATOMIC": atomic}, config)
                assert c.spill_stack_bytes == 0, c
                print(c.name, c.registers, c.shared_bytes)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("triton's bundled ptxas is not available")
    assert proc.returncode == 0, proc.stderr[-3000:]


# -------------------------------------------------------------- GPU-only: autotune


@pytest.mark.skipif(not USE_CUDA, reason="needs a CUDA device (compiled kernels, autotuner)")
@pytest.mark.parametrize("m", [1, 16, 64])
def test_autotuned_kernels_on_gpu(m):
    k, n = 1024, 2048
    layer = random_layer(k, n, 128, seed=11)
    tg = to_dev(gptq_tensors(layer))
    tm = to_dev(marlin_tensors(layer, k, 128))
    x = rand_x(m, k, torch.float16)
    ref = x.float() @ layer["w"].to(DEVICE)
    y = gptq_triton.gptq_matmul(x, tg["qweight"], tg["qzeros"], tg["scales"], None, group_size=128)
    assert_close(y, ref.half(), torch.float16)
    y = marlin_triton.marlin_matmul(x, tm["B"], tm["s"], k=k, n=n, group_size=128)
    assert_close(y, ref.half(), torch.float16)
