"""Model-free RTN (``qtool.model_free``): the same files as the in-model path, byte for
byte, on a synthetic random-init Llama and on the built-in model; the safetensors writer
against ``safetensors.torch.save_file``; ``--include`` for an architecture qtool has no
file for; the choice of path recorded in ``qtool.json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_mini_model
from helpers import run_cli
from safetensors.torch import save_file

MODEL_FILES = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json")


def _quantize(source, out, model_free, **options):
    from qtool.api import quantize
    from qtool.config import QuantizeConfig

    return quantize(None if source is None else str(source), out, QuantizeConfig(method="rtn", **options), model_free=model_free)


def _assert_same_files(a: Path, b: Path) -> None:
    """Every file but the run record (qtool.json) and the card, which quote the path run."""
    names = sorted(f.name for f in a.iterdir() if f.name not in ("qtool.json", "README.md"))
    assert names == sorted(f.name for f in b.iterdir() if f.name not in ("qtool.json", "README.md"))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, default_model_dir) -> Path:
    # untied head and biases on q/k/v so that both lm_head and packed biases are covered
    return make_mini_model(tmp_path_factory.mktemp("mf") / "llama", "llama", default_model_dir, seed=3,
                           tie_word_embeddings=False, attention_bias=True, num_hidden_layers=3)


@pytest.mark.parametrize("options", [
    {"format": "gptq"},
    {"format": "compressed-tensors", "group_size": 32},
    {"format": "awq", "sym": False},
    {"format": "gptq", "sym": False, "exclude": ("*.down_proj",)},
], ids=["gptq", "compressed-tensors-g32", "awq-asym", "gptq-asym-exclude"])
def test_synthetic_llama_same_files_as_in_model(tmp_path, llama_dir, options):
    free = _quantize(llama_dir, tmp_path / "free", None, **options)
    inm = _quantize(llama_dir, tmp_path / "inm", False, **options)
    assert free["model_free"]["used"] is True and inm["model_free"]["used"] is False
    _assert_same_files(tmp_path / "free", tmp_path / "inm")
    assert free["layers"] == inm["layers"] and free["coverage"] == inm["coverage"]


def test_tied_mini_llama_same_files(tmp_path, mini_llama):
    """The conftest mini Llama ties lm_head to the embeddings: stored once, as in-model."""
    free = _quantize(mini_llama, tmp_path / "free", True, format="compressed-tensors")
    _quantize(mini_llama, tmp_path / "inm", False, format="compressed-tensors")
    assert free["coverage"]["tied_lm_head"] is True
    _assert_same_files(tmp_path / "free", tmp_path / "inm")


def test_default_model_same_files_as_in_model(tmp_path, default_model_dir):
    """The built-in SmolLM2 (tied embeddings, 210 linears), GPTQ format."""
    free = _quantize(None, tmp_path / "free", None)
    inm = _quantize(None, tmp_path / "inm", False)
    assert free["model_free"]["used"] is True and len(free["layers"]) == 210
    _assert_same_files(tmp_path / "free", tmp_path / "inm")
    assert free["layers"] == inm["layers"]


def test_safetensors_writer_matches_save_file(tmp_path):
    """``write_safetensors`` from byte ranges gives save_file's bytes (mixed dtypes, odd names)."""
    from qtool.model_free import _Spill, write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(5, 3, generator=g, dtype=torch.float32).to(torch.bfloat16),
               "a.qweight": torch.randint(-2**31, 2**31 - 1, (4, 7), generator=g, dtype=torch.int32),
               "z.scales": torch.randn(3, 2, generator=g).half(), "m.codes": torch.randint(0, 255, (9,), dtype=torch.uint8),
               "c.bias": torch.randn(11, generator=g), "k.g_idx": torch.arange(6, dtype=torch.int64), "e.empty": torch.zeros(0, 4)}
    for i in range(1, 9):  # header lengths of every remainder mod 8
        tensors[f"pad{'x' * i}"] = torch.randn(i, generator=g)
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    spill = _Spill(tmp_path / "spill.bin")
    entries = {k: spill.add(t) for k, t in tensors.items()}
    spill.close()
    write_safetensors(tmp_path / "ours.safetensors", entries, {"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_sharded_split_matches_in_model_writer(tmp_path):
    """Small shards: the same files and index as ``qtool.io``'s writer for the same state."""
    from qtool.io import _write_shards
    from qtool.model_free import _Spill, write_shards

    g = torch.Generator().manual_seed(1)
    state = {f"model.layers.{i}.{n}": torch.randn(64, 48, generator=g) for i in range(4) for n in ("w", "v")}
    state["model.norm.weight"] = torch.randn(48, generator=g)
    (tmp_path / "ref").mkdir()
    (tmp_path / "ours").mkdir()
    ref = _write_shards(state, tmp_path / "ref", "30KB")
    spill = _Spill(tmp_path / "spill.bin")
    entries = {k: spill.add(t) for k, t in state.items()}
    spill.close()
    ours, _ = write_shards(entries, tmp_path / "ours", "30KB")
    assert ours == ref and len(ref) > 2
    for name in [*ref, "model.safetensors.index.json"]:
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_auto_falls_back_when_files_would_differ(tmp_path, mini_llama):
    """A source whose float tensors are not all in the config's dtype would be cast by
    transformers on load: auto mode runs in-model and says why; --model-free casts."""
    from safetensors.torch import load_file

    src = tmp_path / "mixed"
    src.mkdir()
    for f in mini_llama.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    state = load_file(str(mini_llama / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.bfloat16)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    inm = _quantize(src, tmp_path / "inm", None)
    assert inm["model_free"] == {"used": False, "reason": inm["model_free"]["reason"]}
    assert "not torch.float32" in inm["model_free"]["reason"]
    free = _quantize(src, tmp_path / "free", True)
    assert free["model_free"]["used"] is True
    _assert_same_files(tmp_path / "free", tmp_path / "inm")


def test_include_quantizes_an_unknown_architecture(capsys, tmp_path, mini_llama):
    """An architecture neither qtool nor transformers knows: ``--include`` names the
    weights; the codes are those of ``rtn_quantize`` on each weight, the rest is stored
    unchanged."""
    from qtool.io import read_quantized_layers
    from qtool.rtn import rtn_quantize

    g = torch.Generator().manual_seed(2)
    src = tmp_path / "madeup"
    src.mkdir()
    state = {"embed.weight": torch.randn(100, 64, generator=g), "final_norm.weight": torch.randn(64, generator=g)}
    for i in range(2):
        state[f"blocks.{i}.mix.weight"] = torch.randn(96, 64, generator=g)
        state[f"blocks.{i}.mix.bias"] = torch.randn(96, generator=g)
        state[f"blocks.{i}.out.weight"] = torch.randn(64, 96, generator=g)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"model_type": "qtool-madeup", "hidden_size": 64}))

    res = run_cli(capsys, "quantize", src, "--method", "rtn", "-g", "32", "-o", tmp_path / "refused")
    assert res.code != 0 and "--include" in res.err and not (tmp_path / "refused").exists()
    out = tmp_path / "out"
    res = run_cli(capsys, "--json", "quantize", src, "--method", "rtn", "-g", "32", "--include", "blocks.*",
                  "--exclude", "blocks.1.out.*", "-o", out)
    assert res.code == 0, res.err
    record = res.json()
    assert record["model_free"]["used"] is True and record["coverage"]["quantized"] == 3
    qweights, plain, _, _ = read_quantized_layers(out)
    assert sorted(qweights) == ["blocks.0.mix", "blocks.0.out", "blocks.1.mix"]
    for name, qw in qweights.items():
        ref = rtn_quantize(state[f"{name}.weight"], 4, 32, True)
        assert torch.equal(qw.codes, ref.codes) and torch.equal(qw.scales, ref.scales), name
        if f"{name}.bias" in state:  # the gptq format stores biases in float16
            assert torch.equal(qw.bias, state[f"{name}.bias"].to(qw.bias.dtype)), name
    assert sorted(plain) == ["blocks.1.out.weight", "embed.weight", "final_norm.weight"]
    for key, tensor in plain.items():
        assert torch.equal(tensor, state[key]), key
    res = run_cli(capsys, "quantize", src, "--method", "rtn", "--include", "nothing.*", "-o", tmp_path / "none")
    assert res.code != 0 and "nothing.*" in res.err


def test_model_free_refused_where_it_cannot_run(capsys, tmp_path, mini_llama):
    res = run_cli(capsys, "quantize", mini_llama, "--method", "gptq", "--model-free", "-o", tmp_path / "out")
    assert res.code != 0 and "--method gptq needs the model" in res.err
    assert not (tmp_path / "out").exists()


def test_read_back_catches_a_corrupt_tensor(capsys, tmp_path, mini_llama, monkeypatch):
    """One byte of the last packed layer changes on its way to disk: the save fails in one
    line naming the tensor and nothing is left at the output path."""
    import qtool.model_free as mf

    real, corrupted = mf.write_shards, []

    def write_then_corrupt(entries, folder, size):
        shards, written = real(entries, folder, size)
        key = max(k for k in written if k.endswith(".qweight"))
        where = written[key]
        with open(where.path, "r+b") as f:
            f.seek(where.offset + where.nbytes // 2)
            byte = f.read(1)
            f.seek(where.offset + where.nbytes // 2)
            f.write(bytes([byte[0] ^ 0x10]))
        corrupted.append(key)
        return shards, written

    monkeypatch.setattr(mf, "write_shards", write_then_corrupt)
    out = tmp_path / "out"
    res = run_cli(capsys, "quantize", mini_llama, "--method", "rtn", "--model-free", "-o", out)
    assert corrupted == ["model.layers.1.self_attn.v_proj.qweight"]
    line = res.err.strip().splitlines()[-1]
    assert res.code == 1 and line.startswith("qtool: error: read-back check failed") and corrupted[0] in line, res.err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_mixtral_per_expert_names_same_files(tmp_path, default_model_dir):
    """An MoE family: the experts are per-expert tensors on disk
    (``block_sparse_moe.experts.E.w1``); model-free quantizes them under those names and
    the files are the in-model path's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "src")
    AutoTokenizer.from_pretrained(default_model_dir).save_pretrained(tmp_path / "src")
    free = _quantize(tmp_path / "src", tmp_path / "free", None, group_size=32)
    _quantize(tmp_path / "src", tmp_path / "inm", False, group_size=32)
    assert free["model_free"]["used"] is True
    assert "model.layers.1.block_sparse_moe.experts.3.w2" in free["layers"]
    _assert_same_files(tmp_path / "free", tmp_path / "inm")
