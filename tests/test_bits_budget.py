"""Mixed precision under a size budget (``--bits-budget``): the choice is the exact optimum
of the measured sensitivities, the checkpoint states every layer's width in its config
(compressed-tensors config groups, GPTQ ``dynamic``) and is read back layer for layer by
qtool and by transformers + compressed-tensors; formats and methods that cannot carry it
are refused before any work."""

from __future__ import annotations

import importlib.util
import itertools
import json

import pytest
import torch
from helpers import run_cli

HAS_CT = importlib.util.find_spec("compressed_tensors") is not None
CALIB = ("--nsamples", "4", "--seqlen", "32", "--batch-size", "2")


def _quantize(capsys, model, out, *args):
    res = run_cli(capsys, "--json", "quantize", model, "-o", out, "-g", "64", *CALIB, *args)
    assert res.code == 0, res.err
    return res.json()


def _brute_force_best(record: dict, fmt: str, options: dict, shapes: dict, sym: bool, act_order: bool) -> float:
    """The least summed 4-bit KL of the items left at 4 bits, over every 4/8 assignment
    within the budget, sizes from the format's packer."""
    from qtool.budget import layer_bytes

    kl = record["sensitivity"]["kl"]
    items = [(key.split("+"), loss) for key, loss in kl.items()]
    size = {b: [sum(layer_bytes(fmt, options, shapes[n], b, 64, sym, act_order) for n in names) for names, _ in items]
            for b in (4, 8)}
    best = None
    for picks in itertools.product((4, 8), repeat=len(items)):
        total = sum(size[b][i] for i, b in enumerate(picks))
        loss = sum(items[i][1] for i, b in enumerate(picks) if b == 4)
        if total <= record["budget_bytes"] and (best is None or loss < best):
            best = loss
    return best


@pytest.mark.parametrize("method,fmt", [("rtn", "compressed-tensors"), ("gptq", "gptq"),
                                        ("awq-gptq", "compressed-tensors")])
def test_budget_choice_is_optimal_and_stated_in_the_config(capsys, tmp_path, mini_llama, calib_txt, method, fmt):
    from qtool.io import read_quantized_layers

    rec = _quantize(capsys, mini_llama, tmp_path / "out", "--method", method, "--format", fmt,
                    "--bits-budget", "5.0", "--calib", calib_txt)
    budget = rec["bits_budget"]
    assert budget["bytes"] <= budget["budget_bytes"] and budget["bits_per_weight"] <= 5.0
    assert budget["widths"]["4"] and budget["widths"]["8"]  # a real mix at this budget
    layer_bits = dict(rec["config"]["layer_bits"])
    assert set(layer_bits.values()) == {8} and len(layer_bits) == budget["widths"]["8"]
    # one width per group of linears that share an input (the engines fuse them)
    for key in budget["sensitivity"]["kl"]:
        assert len({layer_bits.get(n, 4) for n in key.split("+")}) == 1, key

    qweights, _, read_fmt, params = read_quantized_layers(tmp_path / "out")
    assert read_fmt == fmt and params["bits"] == 4 and len(qweights) == 14
    assert {n: qw.bits for n, qw in qweights.items() if qw.bits != 4} == layer_bits
    for name, qw in qweights.items():  # every code fits its layer's width
        assert int(qw.codes.max()) < 2 ** qw.bits and qw.group_size == 64

    shapes = {n: tuple(qw.shape) for n, qw in qweights.items()}
    options = rec["format_options"]
    act_order = rec["config"]["act_order_kind"] == "dynamic"
    best = _brute_force_best(budget, fmt, options, shapes, rec["config"]["sym"], act_order)
    chosen = sum(loss for key, loss in budget["sensitivity"]["kl"].items() if layer_bits.get(key.split("+")[0], 4) == 4)
    assert chosen == pytest.approx(best, rel=1e-9, abs=1e-12)
    # the real sizes on disk meet the budget too
    from safetensors import safe_open

    files = list((tmp_path / "out").glob("*.safetensors"))
    on_disk = 0
    for f in files:
        with safe_open(str(f), "pt") as h:
            for key in h.keys():
                if key.rsplit(".", 1)[0] in qweights:
                    t = h.get_tensor(key)
                    on_disk += t.numel() * t.element_size()
    assert on_disk == budget["bytes"]

    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    if fmt == "gptq":
        assert cfg["dynamic"] and all(v == {"bits": 8} for v in cfg["dynamic"].values())
    else:
        assert cfg["config_groups"]["group_0"]["targets"] == sorted(layer_bits)
        assert cfg["config_groups"]["group_0"]["weights"]["num_bits"] == 8
        assert cfg["config_groups"]["group_1"]["targets"] == ["Linear"]

    res = run_cli(capsys, "inspect", tmp_path / "out")
    assert res.code == 0, res.err
    assert f"{budget['widths']['8']} at 8 bits" in res.out


@pytest.mark.skipif(not HAS_CT, reason="compressed-tensors is not installed (pip install -e '.[dev]')")
def test_transformers_reads_a_mixed_compressed_tensors_checkpoint(capsys, caplog, tmp_path, mini_llama, calib_txt):
    """transformers' default loading applies each module's config group (an exact name
    before ``Linear``) and decompresses on the first forward: the logits equal qtool's."""
    from test_clients import logits, wikitext_ids
    from transformers import AutoModelForCausalLM

    from qtool.io import load_quantized_model, read_quantized_layers

    ckpt = tmp_path / "ct"
    _quantize(capsys, mini_llama, ckpt, "--method", "rtn", "--format", "compressed-tensors", "--bits-budget", "5.0",
              "--calib", calib_txt)
    qweights, _, _, _ = read_quantized_layers(ckpt)
    assert {qw.bits for qw in qweights.values()} == {4, 8}
    theirs = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    for name, qw in qweights.items():
        assert theirs.get_submodule(name).quantization_scheme.weights.num_bits == qw.bits, name
    assert "Could not match" not in caplog.text  # every per-layer target met its module
    ids = wikitext_ids(ckpt)
    torch.testing.assert_close(logits(theirs, ids), logits(load_quantized_model(ckpt), ids), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_CT, reason="compressed-tensors is not installed (pip install -e '.[dev]')")
@pytest.mark.xfail(strict=True, reason="transformers 5.25 CompressedTensorsConfig(dequantize=True) decompresses "
                                       "every dense layer with one config group's scheme (get_dense_scheme)")
def test_transformers_dequantize_option_reads_per_layer_widths(capsys, tmp_path, mini_llama, calib_txt):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from qtool.io import read_quantized_layers

    ckpt = tmp_path / "ct"
    _quantize(capsys, mini_llama, ckpt, "--method", "rtn", "--format", "compressed-tensors", "--bits-budget", "5.0",
              "--calib", calib_txt)
    theirs = AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    qweights, _, _, _ = read_quantized_layers(ckpt)
    for name, qw in qweights.items():
        assert torch.equal(theirs.get_submodule(name).weight, qw.dequantize(torch.float16).float()), name


def test_mixed_widths_convert_between_formats_that_state_them(capsys, tmp_path, mini_llama, calib_txt):
    from qtool.io import read_quantized_layers

    src = tmp_path / "ct"
    _quantize(capsys, mini_llama, src, "--method", "rtn", "--format", "compressed-tensors", "--bits-budget", "5.0",
              "--calib", calib_txt)
    res = run_cli(capsys, "-q", "convert", src, "--to", "gptq", "-o", tmp_path / "gptq")
    assert res.code == 0, res.err
    a, _, _, _ = read_quantized_layers(src)
    b, _, _, _ = read_quantized_layers(tmp_path / "gptq")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].bits == b[name].bits and torch.equal(a[name].dequantize(), b[name].dequantize()), name
    res = run_cli(capsys, "convert", src, "--to", "awq", "-o", tmp_path / "awq")
    assert res.code != 0 and "per-layer widths" in res.err and not (tmp_path / "awq").exists()


@pytest.mark.parametrize("args,needle", [
    (["--method", "awq", "--format", "awq"], "--format awq cannot state per-layer bit widths"),
    (["--method", "gptq", "--format", "awq"], "--format awq cannot state per-layer bit widths"),
    (["--method", "gptq", "--format", "marlin"], "--format marlin cannot state per-layer bit widths"),
    (["--method", "rtn", "--bits", "8"], "use --bits 4 with it"),
    (["--method", "rtn", "--stream"], "drop --stream"),
    (["--method", "rtn", "--bits-budget", "4.0"], "raise it to at least 4."),
])
def test_refused_before_any_work(capsys, tmp_path, mini_llama, calib_txt, args, needle):
    budget = [] if "--bits-budget" in args else ["--bits-budget", "5.0"]
    res = run_cli(capsys, "quantize", mini_llama, "-o", tmp_path / "out", "-g", "64", *CALIB, "--calib", calib_txt,
                  *budget, *args)
    assert res.code != 0 and needle in res.err, res.err
    last = res.err.strip().splitlines()[-1]  # one line, after the stages that ran (none quantizes)
    assert "Traceback" not in res.err and last.startswith("qtool: error:") and needle in last
    assert not (tmp_path / "out").exists()


def test_image_text_calibration_is_refused(capsys, tmp_path, mini_llama):
    rows = tmp_path / "vlm.jsonl"
    rows.write_text(json.dumps({"image": "a.png", "text": "a picture"}) + "\n")
    res = run_cli(capsys, "quantize", mini_llama, "-o", tmp_path / "out", "--bits-budget", "5", "--calib", rows,
                  "--format", "compressed-tensors")
    assert res.code != 0 and "give it a text --calib" in res.err and not (tmp_path / "out").exists()


def test_layer_params_precedence():
    from qtool.pack import compressed_tensors as ct
    from qtool.pack import gptq, layer_params

    cfg = ct.quantization_config(4, 64, True, False, layers={"model.layers.0.mlp.down_proj": 8})
    cfg["config_groups"]["group_2"] = {**cfg["config_groups"]["group_1"], "targets": ["re:.*mlp\\.down_proj$"],
                                      "weights": {**cfg["config_groups"]["group_1"]["weights"], "num_bits": 4,
                                                  "group_size": 128}}
    params = ct.options_from_config(cfg)
    # an exact name wins over a pattern, a pattern over the class-wide group
    assert layer_params(params, "model.layers.0.mlp.down_proj")["bits"] == 8
    assert layer_params(params, "model.layers.1.mlp.down_proj")["group_size"] == 128
    assert layer_params(params, "model.layers.1.mlp.up_proj") == params
    cfg = gptq.quantization_config(4, 64, True, True, version=1, layers={
        f"model.layers.2.self_attn.{n}": 8 for n in ("q_proj", "k_proj", "v_proj")})
    params = gptq.options_from_config({**cfg, "dynamic": {"-:.*lm_head": {}, **cfg["dynamic"]}})
    assert layer_params(params, "model.layers.2.self_attn.qkv_proj")["bits"] == 8  # vLLM's fused name
    assert layer_params(params, "model.layers.2.self_attn.k_proj")["bits"] == 8
    assert layer_params(params, "model.layers.2.self_attn.o_proj")["bits"] == 4
    assert layer_params(params, "model.layers.12.self_attn.q_proj")["bits"] == 4
