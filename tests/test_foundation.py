"""The foundation end to end on mini models of every family: CLI, loading, RTN pipeline,
GPTQ-format saving read back by an independent reader, eval, inspect, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import MINI_FAMILIES, WIKITEXT_TEST, make_mini_model
from helpers import run_cli


def independent_gptq_dequant(folder: Path, module: str) -> torch.Tensor:
    """GPTQ layout reader written from ../shared/refvectors/README.md §3, independent of
    qtool.pack: returns the float weight [n, k]."""
    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    tensors = {}
    for f in folder.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    qweight = tensors[f"{module}.qweight"].numpy().view("uint32")  # [k/8, n]
    qzeros = tensors[f"{module}.qzeros"].numpy().view("uint32")  # [G, n/8]
    scales = tensors[f"{module}.scales"].float()  # [G, n]
    g_idx = tensors[f"{module}.g_idx"].long()  # [k]
    k8, n = qweight.shape
    codes = torch.zeros(k8 * 8, n)
    for i in range(8):
        codes[i::8] = torch.from_numpy(((qweight >> (4 * i)) & 0xF).astype("int64")).float()
    G = qzeros.shape[0]
    zeros = torch.zeros(G, n)
    for i in range(8):
        zeros[:, i::8] = torch.from_numpy(((qzeros >> (4 * i)) & 0xF).astype("int64")).float()
    if cfg.get("checkpoint_format", cfg.get("format", "gptq")) == "gptq":
        zeros = zeros + 1  # v1 stores zero - 1
    w = (codes - zeros[g_idx]) * scales[g_idx]  # [k, n]
    return w.T


@pytest.mark.parametrize("family", sorted(MINI_FAMILIES))
def test_rtn_quantize_every_family(capsys, tmp_path, mini_models, family):
    from qtool.api import load_any

    out = tmp_path / "out"
    res = run_cli(capsys, "--json", "quantize", mini_models[family], "--method", "rtn", "-o", out)
    assert res.code == 0, res.err
    record = res.json()
    assert record["config"]["group_size"] == 128  # auto: 128 divides 128 and 256
    assert (out / "model.safetensors").is_file() and (out / "qtool.json").is_file()
    assert (out / "tokenizer.json").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "gptq"
    assert cfg["quantization_config"]["bits"] == 4
    assert len(record["layers"]) == 2 * 7
    # tied embeddings stay tied: no lm_head tensor is written
    keys = load_file(str(out / "model.safetensors")).keys()
    assert not any(k.startswith("lm_head") for k in keys)
    model, _, info = load_any(str(out))
    assert info["quantized"]
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_saved_gptq_tensors_equal_written_back_weights(tmp_path, mini_llama):
    """The checkpoint's tensors, dequantized by an independent reader, equal exactly the
    weights qtool wrote back into the model during calibration."""
    from qtool.config import QuantizeConfig
    from qtool.io import save_checkpoint
    from qtool.loading import load_model, resolve
    from qtool.models import spec_for
    from qtool.pipeline import quantize_model
    from qtool.rtn import RTNMethod

    for sym in (True, False):
        model, tok, folder = load_model(resolve(str(mini_llama)))
        spec = spec_for(model)
        config = QuantizeConfig(method="rtn", group_size=64, sym=sym)
        results = quantize_model(model, spec, RTNMethod(), config, None, torch.device("cpu"))
        out = tmp_path / f"ckpt-{sym}"
        save_checkpoint(out, model, tok, folder, {n: r.qweight for n, r in results.items()}, config, {})
        for name in results:
            written_back = model.get_submodule(name).weight.detach()
            assert torch.equal(independent_gptq_dequant(out, name), written_back), name


def test_eval_prints_protocol_and_perplexity(capsys, tmp_path, mini_llama):
    res = run_cli(capsys, "--json", "eval", mini_llama, "--dataset", WIKITEXT_TEST, "--seqlen", "128", "--max-windows", "2")
    assert res.code == 0, res.err
    data = res.json()
    assert data["protocol"]["windows"] == 2 and data["protocol"]["tokens"] == 2 * 127
    assert data["protocol"]["join"] == "\n\n"
    assert data["results"][0]["ppl"] > 1
    human = run_cli(capsys, "eval", mini_llama, "--dataset", WIKITEXT_TEST, "--seqlen", "128", "--max-windows", "1")
    assert human.code == 0 and "protocol:" in human.out


def test_inspect_shows_method_format_and_layers(capsys, tmp_path, mini_llama):
    out = tmp_path / "out"
    assert run_cli(capsys, "quantize", mini_llama, "--method", "rtn", "-g", "64", "-o", out, "-q").code == 0
    res = run_cli(capsys, "inspect", out, "--layers")
    assert res.code == 0
    assert "rtn 4-bit group 64 sym, format gptq" in res.out
    assert "model.layers.1.mlp.down_proj" in res.out
    data = run_cli(capsys, "--json", "inspect", out, "--verify").json()
    assert data["verified"] is True and data["method"] == "rtn"


def test_version(capsys):
    from qtool import __version__

    res = run_cli(capsys, "--version")
    assert res.code == 0 and __version__ in res.out


# ---- bad inputs: one line, non-zero exit, nothing left behind ----

def _assert_clean_failure(res, tmp_path, needle):
    assert res.code == 1, (res.code, res.err)
    lines = [ln for ln in res.err.strip().splitlines() if ln.startswith("qtool: error")]
    assert len(lines) == 1 and needle in lines[0], res.err
    assert "Traceback" not in res.err
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())


def test_missing_model_path(capsys, tmp_path):
    res = run_cli(capsys, "quantize", tmp_path / "nope", "--method", "rtn", "-o", tmp_path / "out")
    _assert_clean_failure(res, tmp_path, "does not exist")


def test_folder_that_is_not_a_model(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    res = run_cli(capsys, "quantize", tmp_path / "empty", "--method", "rtn", "-o", tmp_path / "out")
    _assert_clean_failure(res, tmp_path, "no config.json")


def test_unsupported_architecture(capsys, tmp_path, default_model_dir):
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=1000))
    model.save_pretrained(tmp_path / "gpt2")
    res = run_cli(capsys, "quantize", tmp_path / "gpt2", "--method", "rtn", "-o", tmp_path / "out")
    _assert_clean_failure(res, tmp_path, "unsupported architecture 'gpt2'")


def test_group_size_that_does_not_divide(capsys, tmp_path, default_model_dir):
    model = make_mini_model(tmp_path / "m96", "llama", default_model_dir, hidden_size=96, intermediate_size=192,
                            num_attention_heads=3, num_key_value_heads=1)
    res = run_cli(capsys, "quantize", model, "--method", "rtn", "--group-size", "64", "-o", tmp_path / "out")
    _assert_clean_failure(res, tmp_path, "does not divide")
    assert "32" in res.err  # names a size that works


def test_empty_calibration_file(capsys, tmp_path, mini_llama):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    res = run_cli(capsys, "quantize", mini_llama, "--method", "gptq", "--calib", empty, "-o", tmp_path / "out")
    _assert_clean_failure(res, tmp_path, "empty")


def test_output_that_exists(capsys, tmp_path, mini_llama):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    res = run_cli(capsys, "quantize", mini_llama, "--method", "rtn", "-o", tmp_path / "out")
    assert res.code == 1 and "already exists" in res.err and "--force" in res.err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_usage_error_exit_code(capsys):
    assert run_cli(capsys, "quantize", "--bogus-option").code == 2
