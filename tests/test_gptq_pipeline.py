"""GPTQ through the whole pipeline on mini models: act-order / static groups / true-
sequential options, every format, and the quantized model closer to the float one than
RTN's."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_cli
from test_foundation import independent_gptq_dequant


def _quantize(capsys, model, out, calib, *extra):
    res = run_cli(capsys, "--json", "quantize", model, "--calib", calib, "--nsamples", "8", "--seqlen", "64",
                  "-o", out, *extra)
    assert res.code == 0, res.err
    return res.json()


def _hidden_error(model_dir, ckpt, ids):
    """Mean squared difference of the last hidden states of the float and quantized models."""
    from qtool.api import load_any

    ref, _, _ = load_any(str(model_dir))
    q, _, _ = load_any(str(ckpt))
    with torch.inference_mode():
        a = ref(ids, output_hidden_states=True).hidden_states[-1]
        b = q(ids, output_hidden_states=True).hidden_states[-1]
    return float(((a - b) ** 2).mean())


def test_gptq_beats_rtn_on_model_output(capsys, tmp_path, mini_llama, calib_txt):
    from transformers import AutoTokenizer

    _quantize(capsys, mini_llama, tmp_path / "gptq", calib_txt, "--method", "gptq", "-g", "64")
    _quantize(capsys, mini_llama, tmp_path / "rtn", calib_txt, "--method", "rtn", "-g", "64")
    tok = AutoTokenizer.from_pretrained(mini_llama)
    ids = tok(calib_txt.read_text()[:3000], return_tensors="pt").input_ids[:, :256]
    assert _hidden_error(mini_llama, tmp_path / "gptq", ids) < _hidden_error(mini_llama, tmp_path / "rtn", ids)


def test_act_order_checkpoint_has_non_monotone_g_idx_and_reads_back(capsys, tmp_path, mini_llama, calib_txt):
    from qtool.api import load_any

    record = _quantize(capsys, mini_llama, tmp_path / "ao", calib_txt, "--method", "gptq", "-g", "32", "--act-order")
    assert record["config"]["act_order"] is True
    cfg = json.loads((tmp_path / "ao" / "config.json").read_text())["quantization_config"]
    assert cfg["desc_act"] is True
    tensors = load_file(str(tmp_path / "ao" / "model.safetensors"))
    g_idx = tensors["model.layers.0.mlp.down_proj.g_idx"]
    assert bool((g_idx[1:] < g_idx[:-1]).any())
    model, _, _ = load_any(str(tmp_path / "ao"))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        assert torch.equal(independent_gptq_dequant(tmp_path / "ao", name), model.get_submodule(name).weight)
    # per-layer loss is reported
    assert all("loss" in stats for stats in record["layers"].values())


def test_static_groups_keep_g_idx_monotone(capsys, tmp_path, mini_llama, calib_txt):
    _quantize(capsys, mini_llama, tmp_path / "sg", calib_txt, "--method", "gptq", "-g", "32", "--act-order", "--static-groups")
    cfg = json.loads((tmp_path / "sg" / "config.json").read_text())["quantization_config"]
    assert cfg["desc_act"] is False
    g_idx = load_file(str(tmp_path / "sg" / "model.safetensors"))["model.layers.0.mlp.down_proj.g_idx"]
    assert torch.equal(g_idx.long(), torch.arange(g_idx.numel()) // 32)


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_every_group_size_reads_back_exactly(capsys, tmp_path, mini_llama, calib_txt, group_size):
    """Each group size the model allows: the stored scales have one row per group and the
    GPTQ tensors, read by the independent reader, equal what qtool's loader gives."""
    from qtool.api import load_any

    record = _quantize(capsys, mini_llama, tmp_path / "g", calib_txt, "--method", "gptq", "-g", str(group_size))
    assert record["config"]["group_size"] == group_size
    name = "model.layers.1.mlp.down_proj"  # k = 256
    scales = load_file(str(tmp_path / "g" / "model.safetensors"))[f"{name}.scales"]
    assert scales.shape[0] == (1 if group_size == -1 else 256 // group_size)
    model, _, _ = load_any(str(tmp_path / "g"))
    assert torch.equal(independent_gptq_dequant(tmp_path / "g", name), model.get_submodule(name).weight.float())


@pytest.mark.parametrize("fmt,extra", [
    ("gptq", ["--no-act-order", "--gptq-version", "2"]),
    ("marlin", []),
    ("marlin", ["--asym", "--no-act-order"]),
    ("compressed-tensors", []),
    ("awq", ["--asym", "--no-act-order"]),
])
def test_gptq_into_every_format(capsys, tmp_path, mini_llama, calib_txt, fmt, extra):
    from qtool.api import load_any

    _quantize(capsys, mini_llama, tmp_path / "o", calib_txt, "--method", "gptq", "-g", "64", "--format", fmt, *extra)
    model, _, info = load_any(str(tmp_path / "o"))
    assert info["quantized"]


def test_incompatible_format_option_rejected_before_calibration(capsys, tmp_path, mini_llama, calib_txt):
    res = run_cli(capsys, "quantize", mini_llama, "--method", "gptq", "--format", "awq", "--act-order",
                  "--dynamic-groups", "--asym", "--calib", tmp_path / "does-not-exist.txt", "-o", tmp_path / "out")
    # the format check fires before the calibration file is even looked at
    assert res.code == 1 and "--format awq" in res.err
    assert not (tmp_path / "out").exists()


def test_no_true_sequential_runs(capsys, tmp_path, mini_llama, calib_txt):
    record = _quantize(capsys, mini_llama, tmp_path / "nts", calib_txt, "--method", "gptq", "--no-true-sequential")
    assert record["config"]["true_sequential"] is False and len(record["layers"]) == 14


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_replayed_stages_equal_rerunning_the_block(mini_models, family):
    """The fast path (cached intermediate tensors) gives bit-identical codes and block
    outputs to re-running the whole block for every true-sequential stage."""
    from dataclasses import replace as dc_replace

    from transformers import AutoTokenizer

    from qtool.config import QuantizeConfig
    from qtool.gptq.method import GPTQMethod
    from qtool.loading import load_model, resolve
    from qtool.models import spec_for
    from qtool.pipeline import quantize_model

    tok = AutoTokenizer.from_pretrained(mini_models[family])
    ids = tok(" ".join(f"token run {i} with numbers {i * 13}" for i in range(200)), return_tensors="pt").input_ids
    ids = ids[0, : 4 * 64].reshape(4, 64)
    config = QuantizeConfig(method="gptq", group_size=64, nsamples=4, seqlen=64, batch_size=2)
    results = []
    for fast in (True, False):
        model, _, _ = load_model(resolve(str(mini_models[family])))
        spec = spec_for(model)
        if not fast:
            spec = dc_replace(spec, attention=None, mlp=None)
        results.append(quantize_model(model, spec, GPTQMethod(), config, ids, torch.device("cpu")))
    assert results[0].keys() == results[1].keys()
    for name in results[0]:
        assert results[0][name].qweight.equal(results[1][name].qweight), name
