"""AWQ: exact scale folding, the scale and clip searches on synthetic data, search
results saved and re-applied bit for bit, and AWQ beating RTN where activations have
outlier channels. Mini random-init models, fixed seeds."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from conftest import mini_config
from helpers import run_cli
from torch import nn


def _model(family: str, seed: int = 0, outliers: tuple[int, ...] = (), **overrides):
    """A mini random-init model; ``outliers``: hidden channels whose norm weights are
    multiplied by 30 in every block, so those activation channels dominate."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(mini_config(family, **overrides), dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[list(outliers)] *= 30.0
    return model


def _ids(n: int, seqlen: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 49152, (n, seqlen), generator=gen)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def _quantize(model, method, group_size: int = 64, calib: torch.Tensor | None = None):
    from qtool.config import QuantizeConfig
    from qtool.models import spec_for
    from qtool.pipeline import quantize_model

    config = QuantizeConfig(method=method.name, group_size=group_size, sym=False, batch_size=4)
    return quantize_model(model, spec_for(model), method, config, calib, torch.device("cpu"))


def _output_error(weight, dequantized, x) -> float:
    return float(((x.double() @ (weight.double() - dequantized.double()).T) ** 2).sum())


# --- primitives -------------------------------------------------------------------------

@pytest.mark.parametrize("sym", [True, False])
def test_fake_quantize_equals_rtn(sym):
    from qtool.awq.fake_quant import fake_quantize
    from qtool.rtn import rtn_quantize

    torch.manual_seed(0)
    w = torch.randn(48, 256)
    clip = w.reshape(48, 4, 64).abs().amax(-1) * torch.rand(48, 4).clamp_min(0.5)
    for group_size, clip_max in ((64, None), (64, clip), (-1, None)):
        expected = rtn_quantize(w, 4, group_size, sym, clip_max=clip_max).dequantize()
        assert torch.equal(fake_quantize(w, 4, group_size, sym, clip_max), expected)


def test_uniform_activations_pick_alpha_zero():
    """Equal activation magnitude on every channel: all candidates are s = 1, and the
    first (alpha = 0) is kept, for both scorers."""
    from qtool.awq.auto_scale import search_linear_scale, search_module_scale
    from qtool.awq.stats import ModuleCalls

    torch.manual_seed(0)
    x = torch.randn(512, 128).sign()  # |x| = 1 on every channel
    lin = nn.Linear(128, 64)
    res = search_linear_scale(lin.weight, x.T @ x, 512, x.abs().mean(0), 4, 64, False, 20, "g")
    assert res.alpha == 0.0 and torch.equal(res.scales, torch.ones(128))
    calls = ModuleCalls(args=[(x,)], kwargs=[{}])
    res = search_module_scale(lin, [lin], calls, x.abs().mean(0), 4, 64, False, 20, "g")
    assert res.alpha == 0.0 and torch.equal(res.scales, torch.ones(128))


def test_outlier_channels_pick_alpha_above_zero_and_lower_error():
    from qtool.awq.auto_scale import search_linear_scale

    torch.manual_seed(0)
    x = torch.randn(1024, 128)
    x[:, [3, 50, 99]] *= 40.0
    w = torch.randn(64, 128)
    res = search_linear_scale(w, x.T @ x, 1024, x.abs().mean(0), 4, 64, False, 20, "g")
    assert res.alpha > 0 and res.loss < 0.7 * res.loss_unscaled


def test_zero_activations_give_finite_scales():
    from qtool.awq.auto_scale import candidate_scales

    mean_abs = torch.tensor([0.0, 0.0, 1.0, 5.0])
    for alpha in (0.0, 0.5, 0.95):
        s = candidate_scales(mean_abs, alpha)
        assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.equal(candidate_scales(torch.zeros(8), 0.5), torch.ones(8))


def test_non_finite_loss_names_the_group():
    from qtool.awq.auto_scale import search_linear_scale
    from qtool.errors import NumericsError

    gram = torch.eye(128)
    gram[0, 0] = float("inf")
    with pytest.raises(NumericsError, match="layers.3.input_layernorm"):
        search_linear_scale(torch.randn(8, 128), gram, 1, torch.ones(128), 4, 64, False, 4,
                            "model.layers.3.input_layernorm")


@pytest.mark.parametrize("sym,group_size", [(False, 64), (True, 64), (False, -1)])
def test_clip_never_increases_layer_error(sym, group_size):
    from qtool.awq.auto_clip import search_clip
    from qtool.rtn import rtn_quantize

    torch.manual_seed(1)
    x = torch.randn(2048, 256) @ (torch.eye(256) + 0.3 * torch.randn(256, 256))  # correlated channels
    w = torch.distributions.StudentT(3.0).sample((96, 256))  # heavy tails: clipping helps
    gram = (x.double().T @ x.double()).float()
    clip_max = search_clip(w, gram, 4, group_size, sym)
    plain = rtn_quantize(w, 4, group_size, sym).dequantize()
    clipped = rtn_quantize(w, 4, group_size, sym, clip_max=clip_max).dequantize()
    rows_plain = ((x.double() @ (w - plain).double().T) ** 2).sum(0)
    rows_clipped = ((x.double() @ (w - clipped).double().T) ** 2).sum(0)
    assert (rows_clipped <= rows_plain).all()
    assert rows_clipped.sum() < 0.95 * rows_plain.sum()
    absmax = w.reshape(96, -1, 256 if group_size == -1 else group_size).abs().amax(-1)
    assert (clip_max <= absmax).all() and (clip_max >= 0.5 * absmax - 1e-6).all()


# --- folding ----------------------------------------------------------------------------

@pytest.mark.parametrize("family,overrides", [("llama", {}), ("qwen2", {"num_key_value_heads": 4})])
def test_fold_keeps_float_logits(family, overrides):
    """Searched scales folded into a float model (no quantization) leave its logits
    unchanged; qwen2 with as many kv heads as heads also folds v_proj (with bias) into
    o_proj."""
    from qtool.awq.apply import fold_scales
    from qtool.awq.method import AWQMethod
    from qtool.models import get_blocks, spec_for

    model = _model(family, outliers=(5, 77), **overrides)
    ids = _ids(2, 48, seed=1)
    reference = _logits(model, ids)
    method = AWQMethod()
    _quantize(copy.deepcopy(model), method, calib=_ids(8, 48, seed=2))
    scales = method.search_results["scales"]
    spec = spec_for(model)
    expected_groups = 4 if overrides else 3
    assert len(scales) == expected_groups * len(get_blocks(model, spec))
    assert max(float((s - 1).abs().max()) for s in scales.values()) > 0.5  # non-trivial scales
    for i, block in enumerate(get_blocks(model, spec)):
        for group in spec.scale_groups:
            key = f"{spec.blocks}.{i}.{group.prev}"
            if key in scales:
                fold_scales(block.get_submodule(group.prev), [block.get_submodule(n) for n in group.linears],
                            scales[key], key, kind=group.kind)
    if overrides:
        assert model.model.layers[0].self_attn.v_proj.bias is not None
    folded = _logits(model, ids)
    torch.testing.assert_close(folded, reference, rtol=1e-4, atol=1e-4)


# --- end to end -------------------------------------------------------------------------

def test_awq_beats_rtn_with_outlier_channels():
    from qtool.awq.method import AWQMethod
    from qtool.rtn import RTNMethod

    model = _model("llama", outliers=(3, 40, 97))
    ids = _ids(4, 64, seed=3)
    reference = _logits(model, ids)
    rtn_model, awq_model = copy.deepcopy(model), copy.deepcopy(model)
    _quantize(rtn_model, RTNMethod())
    results = _quantize(awq_model, AWQMethod(), calib=_ids(16, 64, seed=4))
    rtn_err = float(((_logits(rtn_model, ids) - reference) ** 2).mean())
    awq_err = float(((_logits(awq_model, ids) - reference) ** 2).mean())
    assert awq_err < 0.8 * rtn_err, (awq_err, rtn_err)
    stats = results["model.layers.0.mlp.down_proj"].stats
    assert {"alpha", "out_rel_err", "weight_rel_err", "seconds"} <= stats.keys()
    # the relative errors in percent, with one meaning for every method (qtool.layer_error)
    assert stats["out_rel_err"] == pytest.approx((stats["rel_output_error_pct"] / 100) ** 2)
    assert 0 < stats["rel_output_error_pct"] < 100 and 0 < stats["rel_weight_error_pct"] < 100


def _sha256s(folder) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.iterdir()) if f.is_file() and f.name not in ("qtool.json", "README.md")}


def test_saved_search_reapplies_byte_identically(capsys, tmp_path, mini_llama, calib_txt):
    search = tmp_path / "search.safetensors"
    common = ["quantize", mini_llama, "--method", "awq", "-g", "64", "--nsamples", "8", "--seqlen", "64",
              "--batch-size", "4", "--calib", calib_txt]
    first = run_cli(capsys, "--json", *common, "-o", tmp_path / "a", "--save-search", search)
    assert first.code == 0, first.err
    assert search.is_file()
    second = run_cli(capsys, "--json", *common, "-o", tmp_path / "b", "--load-search", search)
    assert second.code == 0, second.err
    assert second.json()["calibration"] is None  # applying a search needs no calibration
    a, b = _sha256s(tmp_path / "a"), _sha256s(tmp_path / "b")
    assert any(name.endswith(".safetensors") for name in a)
    assert a == b


def test_search_file_roundtrip_and_validation(capsys, tmp_path, mini_llama):
    from qtool.awq.search_io import load_search, save_search

    results = {"scales": {"model.layers.0.input_layernorm": torch.rand(128) + 0.5},
               "clip_max": {"model.layers.0.mlp.down_proj": torch.rand(128, 4)},
               "alpha": {"model.layers.0.input_layernorm": 0.35}}
    path = tmp_path / "s.safetensors"
    save_search(path, results)
    loaded = load_search(path)
    assert loaded["alpha"] == results["alpha"]
    for kind in ("scales", "clip_max"):
        assert loaded[kind].keys() == results[kind].keys()
        assert all(torch.equal(loaded[kind][k], results[kind][k]) for k in results[kind])

    res = run_cli(capsys, "quantize", mini_llama, "--method", "rtn", "-o", tmp_path / "o", "--save-search", path)
    assert res.code == 1 and "only apply to --method awq" in res.err
    res = run_cli(capsys, "quantize", mini_llama, "--method", "awq", "-o", tmp_path / "o",
                  "--load-search", tmp_path / "missing.safetensors")
    assert res.code == 1 and "does not exist" in res.err
    res = run_cli(capsys, "quantize", mini_llama, "--method", "awq", "-g", "64", "-o", tmp_path / "o",
                  "--load-search", path)
    assert res.code == 1 and "search again without --load-search" in res.err


def test_resumed_run_saves_the_whole_search(tmp_path, mini_llama, calib_txt, monkeypatch):
    """Interrupted after block 0 and resumed: the saved search holds every block's
    results (block 0's come back from the work folder) and equals an uninterrupted run's."""
    import qtool.resume
    from qtool.api import quantize as api_quantize
    from qtool.awq.search_io import load_search
    from qtool.config import QuantizeConfig

    def config(search):
        return QuantizeConfig(method="awq", group_size=64, calib=str(calib_txt), nsamples=8, seqlen=64,
                              batch_size=4, awq_save_search=str(search))

    api_quantize(str(mini_llama), tmp_path / "ref", config(tmp_path / "ref.safetensors"))
    real = qtool.resume.WorkDir.save_block

    def save_then_stop(self, index, *args, **kwargs):
        real(self, index, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(qtool.resume.WorkDir, "save_block", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        api_quantize(str(mini_llama), tmp_path / "out", config(tmp_path / "out.safetensors"))
    monkeypatch.setattr(qtool.resume.WorkDir, "save_block", real)
    record = api_quantize(str(mini_llama), tmp_path / "out", config(tmp_path / "out.safetensors"), resume=True)
    assert record["resumed_from_block"] == 1
    ref, out = load_search(tmp_path / "ref.safetensors"), load_search(tmp_path / "out.safetensors")
    assert ref["alpha"] == out["alpha"] and len(ref["scales"]) == 6
    for kind in ("scales", "clip_max"):
        assert ref[kind].keys() == out[kind].keys()
        assert all(torch.equal(ref[kind][k], out[kind][k]) for k in ref[kind])
    assert _sha256s(tmp_path / "ref") == _sha256s(tmp_path / "out")
