"""Our packers against the reference vectors made by the original packers
(``shared/refvectors``): bit-for-bit packed tensors, and exact ``w_deq`` from unpack."""

from __future__ import annotations

import pytest
import torch
from pack_helpers import REFVECTORS, field, tensors_identical, unpack_like
from safetensors import safe_open

from qtool.errors import FormatError, UnsupportedError
from qtool.pack import awq, gptq, marlin
from qtool.qtensor import QuantizedWeight


@pytest.fixture(scope="module")
def refdir():
    """``<repo>/../shared/refvectors``; the tests skip when it is not there."""
    if not (REFVECTORS / "README.md").exists():
        pytest.skip(f"reference vectors not found at {REFVECTORS}")
    return REFVECTORS


def _load(refdir, rel: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(refdir / rel), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata()


def _qw(
    ref: dict, group_size: int, sym: bool, g_idx: torch.Tensor | None = None
) -> QuantizedWeight:
    """The canonical form of a vector file: codes [k,n] -> [n,k], scales/zeros [G,n] -> [n,G]."""
    return QuantizedWeight(
        codes=ref["codes"].T.contiguous(),
        scales=ref["scales"].T.contiguous(),
        zeros=None if sym else ref["zeros"].T.contiguous(),
        g_idx=g_idx,
        bits=4,
        group_size=group_size,
        sym=sym,
    )


def _assert_reads_w_deq(fmt, tensors: dict, qw: QuantizedWeight, ref: dict, **options) -> None:
    """Unpacking the reference tensors gives back the canonical input and exactly ``w_deq``."""
    got = unpack_like(fmt, tensors, qw, **options)
    assert got.equal(qw)
    w_deq = ref["w_deq"].T  # [k, n] -> [n, k]
    assert torch.equal(got.dequantize(torch.float16), w_deq)
    assert torch.equal(got.dequantize(torch.float32).half(), w_deq)


def test_marlin_perm_tables_match_closed_form(refdir):
    perms, _ = _load(refdir, "marlin/perms.safetensors")
    assert torch.equal(marlin.weight_perm(), perms["weight_perm"].long())
    assert torch.equal(marlin.scale_perm(), perms["scale_perm"].long())
    assert torch.equal(marlin.scale_perm_single(), perms["scale_perm_single"].long())


MARLIN_SYM = [
    "case_k256_n256_g128",
    "case_k256_n256_gm1",
    "case_k128_n512_g128",
    "case_k256_n128_g64",
    "case_k128_n64_g32",
]


@pytest.mark.parametrize("case", MARLIN_SYM)
def test_marlin_sym_vectors(refdir, case):
    ref, meta = _load(refdir, f"marlin/{case}.safetensors")
    qw = _qw(ref, int(meta["group_size"]), sym=True)
    packed = marlin.pack(qw)
    assert sorted(packed) == ["B", "s"]
    assert torch.equal(packed["B"], ref["B"])
    assert torch.equal(packed["s"], ref["s"])
    assert torch.equal(gptq.pack(qw)["qweight"], ref["gptq_qweight"])
    _assert_reads_w_deq(marlin, {"B": ref["B"], "s": ref["s"]}, qw, ref)


def test_marlin_awq_zero_point_vector(refdir):
    ref, meta = _load(refdir, "marlin/case_awq_zp_k256_n256_g128.safetensors")
    qw = _qw(ref, int(meta["group_size"]), sym=False)
    packed = marlin.pack(qw)
    assert sorted(packed) == ["B", "s", "zp"]
    for key in ("B", "s", "zp"):
        assert torch.equal(packed[key], ref[key]), key
    a = awq.pack(qw)
    assert torch.equal(a["qweight"], ref["awq_qweight"])
    assert torch.equal(a["qzeros"], ref["awq_qzeros"])
    _assert_reads_w_deq(marlin, {key: ref[key] for key in ("B", "s", "zp")}, qw, ref)
    _assert_reads_w_deq(
        awq,
        {"qweight": ref["awq_qweight"], "qzeros": ref["awq_qzeros"], "scales": ref["scales"]},
        qw,
        ref,
    )


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_sym_vectors(refdir, act_order):
    ref, meta = _load(refdir, f"gptq/case_sym_g128_descact_{str(act_order).lower()}.safetensors")
    g = int(meta["group_size"])
    qw = _qw(ref, g, sym=True, g_idx=ref["g_idx"] if act_order else None)
    assert act_order == (not torch.equal(ref["g_idx"], (torch.arange(256) // g).int()))

    v1, v2 = gptq.pack(qw, version=1), gptq.pack(qw, version=2)
    assert sorted(v1) == ["g_idx", "qweight", "qzeros", "scales"]
    for key in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(v1[key], ref[key]), key
    assert torch.equal(v2["qzeros"], ref["qzeros_v2"])
    assert bool((ref["qzeros"] == 0x77777777).all()) and bool(
        (ref["qzeros_v2"] == -0x77777778).all()
    )
    assert all(torch.equal(v1[key], v2[key]) for key in v1 if key != "qzeros")
    assert torch.equal(gptq.pack(qw)["qzeros"], ref["qzeros"])  # sym default: v1

    base = {key: ref[key] for key in ("qweight", "scales", "g_idx")}
    _assert_reads_w_deq(gptq, {**base, "qzeros": ref["qzeros"]}, qw, ref, version=1)
    _assert_reads_w_deq(gptq, {**base, "qzeros": ref["qzeros_v2"]}, qw, ref, version=2)

    # vLLM gptq_marlin load-time result
    m = marlin.pack(qw)
    assert torch.equal(m["B"], ref["marlin_B"])
    assert torch.equal(m["s"], ref["marlin_s"])
    if act_order:
        assert torch.equal(m["perm"], ref["marlin_perm"])
        assert torch.equal(m["g_idx"], ref["marlin_g_idx"])
        stored = {
            "B": ref["marlin_B"],
            "s": ref["marlin_s"],
            "g_idx": ref["marlin_g_idx"],
            "perm": ref["marlin_perm"],
        }
    else:
        assert sorted(m) == ["B", "s"]
        stored = {"B": ref["marlin_B"], "s": ref["marlin_s"]}
    _assert_reads_w_deq(marlin, stored, qw, ref)


def _clean_word_columns(zeros_gn: torch.Tensor) -> torch.Tensor:
    """Indices of 8-column blocks whose zeros are >= 1 in every group (v1-representable)."""
    G, n = zeros_gn.shape
    return torch.nonzero((zeros_gn.reshape(G, n // 8, 8) > 0).all(-1).all(0)).flatten()


def _subset_columns(qw: QuantizedWeight, blocks: torch.Tensor) -> QuantizedWeight:
    rows = (blocks.view(-1, 1) * 8 + torch.arange(8)).flatten()
    return QuantizedWeight(
        codes=qw.codes[rows],
        scales=qw.scales[rows],
        zeros=qw.zeros[rows],
        g_idx=qw.g_idx,
        bits=qw.bits,
        group_size=qw.group_size,
        sym=qw.sym,
    )


def test_gptq_asym_vector_and_v1_zero_corner(refdir):
    ref, meta = _load(refdir, "gptq/case_asym_g128_descact_false.safetensors")
    qw = _qw(ref, int(meta["group_size"]), sym=False)
    assert bool((ref["zeros"] == 0).any())

    v2 = gptq.pack(qw, version=2)
    for key, ref_key in (
        ("qweight", "qweight"),
        ("qzeros", "qzeros_v2"),
        ("scales", "scales"),
        ("g_idx", "g_idx"),
    ):
        assert torch.equal(v2[key], ref[ref_key]), key
    assert tensors_identical(gptq.pack(qw), v2)  # asym default: v2
    assert gptq.quantization_config(4, 128, False, False)["checkpoint_format"] == "gptq_v2"

    # v1 cannot hold a zero of 0: refused at pack time, never written
    with pytest.raises(UnsupportedError, match="--gptq-version 2"):
        gptq.pack(qw, version=1)
    # words without a zero of 0 agree with GPTQModel's v1 words bit for bit
    blocks = _clean_word_columns(ref["zeros"])
    assert blocks.numel() >= 3
    sub = gptq.pack(_subset_columns(qw, blocks), version=1)
    assert torch.equal(sub["qzeros"], ref["qzeros"][:, blocks])
    # the references' v1 words for zero 0 (word borrow / all-ones) are refused on read
    base = {key: ref[key] for key in ("qweight", "scales", "g_idx")}
    for bad in ("qzeros", "qzeros_v1_autogptq"):
        with pytest.raises(FormatError, match="zero of 0"):
            unpack_like(gptq, {**base, "qzeros": ref[bad]}, qw, version=1)
    _assert_reads_w_deq(gptq, {**base, "qzeros": ref["qzeros_v2"]}, qw, ref, version=2)


def test_awq_vector(refdir):
    ref, meta = _load(refdir, "awq/case_g128_zp.safetensors")
    qw = _qw(ref, int(meta["group_size"]), sym=False)
    packed = awq.pack(qw)
    assert sorted(packed) == ["qweight", "qzeros", "scales"]
    for key in packed:
        assert torch.equal(packed[key], ref[key]), key
    _assert_reads_w_deq(awq, {key: ref[key] for key in ("qweight", "qzeros", "scales")}, qw, ref)

    # vLLM awq_marlin load-time result
    m = marlin.pack(qw)
    for key in ("B", "s", "zp"):
        assert torch.equal(m[key], ref[f"marlin_{key}"]), key
    _assert_reads_w_deq(marlin, {key: ref[f"marlin_{key}"] for key in ("B", "s", "zp")}, qw, ref)

    # AutoAWQ's exllama (GPTQ v1) conversion: same qweight; zeros only where v1 can hold them
    assert torch.equal(gptq.pack(qw, version=2)["qweight"], ref["exllama_qweight"])
    with pytest.raises(UnsupportedError):
        gptq.pack(qw, version=1)
    blocks = _clean_word_columns(ref["zeros"])
    assert torch.equal(
        gptq.pack(_subset_columns(qw, blocks), version=1)["qzeros"],
        ref["exllama_qzeros"][:, blocks],
    )
    # a borrowed word really does decode wrong nibble-wise: the reason for the refusal
    gr, c = [int(i) for i in torch.nonzero((ref["zeros"].reshape(2, 32, 8) == 0).any(-1))[0]]
    word = int(ref["exllama_qzeros"][gr, c])
    assert [field(word, p) + 1 for p in range(8)] != ref["zeros"][gr, 8 * c : 8 * c + 8].tolist()
