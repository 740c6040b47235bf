"""Streaming (``qtool.streaming``): a block's weights are read from the shards only while it
is worked on, and the checkpoint is the one of loading the model whole, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_mini_model
from helpers import run_cli


@pytest.fixture(scope="module")
def sharded_bf16(tmp_path_factory, default_model_dir) -> Path:
    """A bf16 mini Llama with an untied head, saved in several shards."""
    from transformers import AutoModelForCausalLM

    folder = make_mini_model(tmp_path_factory.mktemp("s") / "m", "llama", default_model_dir, seed=3,
                             num_hidden_layers=3, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    model.save_pretrained(folder, max_shard_size="1MB")
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


def test_streamed_blocks_are_what_from_pretrained_loads(sharded_bf16):
    """Every parameter and buffer a streamed block gets equals (dtype and bits) the one of
    ``from_pretrained``; the rotary tables are computed, the head comes from the source."""
    from transformers import AutoModelForCausalLM

    from qtool.models import get_blocks, spec_for
    from qtool.streaming import build_skeleton

    whole = AutoModelForCausalLM.from_pretrained(sharded_bf16, dtype="auto")
    model, weights = build_skeleton(str(sharded_bf16), "auto")
    spec = spec_for(model)
    ref = whole.state_dict()
    blocks = get_blocks(model, spec)
    assert all(p.is_meta for b in blocks for p in b.parameters())  # nothing of a block is read up front
    for i, block in enumerate(blocks):
        with weights.loaded(block, f"{spec.blocks}.{i}"):
            for name, t in block.state_dict().items():
                r = ref[f"{spec.blocks}.{i}.{name}"]
                assert t.dtype == r.dtype and torch.equal(t, r), name
        assert all(p.is_meta for p in block.parameters())  # released
    for name, buf in model.named_buffers():
        assert torch.equal(buf, dict(whole.named_buffers())[name]), name
    assert torch.equal(model.get_input_embeddings().weight, whole.get_input_embeddings().weight)
    assert torch.equal(weights.rest(model, ["lm_head.weight"])["lm_head.weight"], ref["lm_head.weight"])


def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.name not in ("qtool.json", "README.md")}


@pytest.mark.parametrize("method,extra", [("rtn", ["--no-model-free"]), ("gptq", ["--act-order"]), ("awq", [])])
def test_streamed_checkpoint_is_byte_identical_to_loading_whole(capsys, tmp_path, sharded_bf16, calib_txt, method, extra):
    args = ["quantize", sharded_bf16, "--method", method, "--group-size", "32", "--calib", calib_txt,
            "--nsamples", "4", "--seqlen", "32", "--json", *extra]
    streamed = run_cli(capsys, *args, "-o", tmp_path / "streamed")
    whole = run_cli(capsys, *args, "-o", tmp_path / "whole", "--no-stream")
    assert streamed.code == 0 and whole.code == 0, streamed.err + whole.err
    a, b = json.loads((tmp_path / "streamed" / "qtool.json").read_text()), json.loads((tmp_path / "whole" / "qtool.json").read_text())
    assert a["streamed"] == {"used": True, "reason": "streamed"}
    assert b["streamed"] == {"used": False, "reason": "--no-stream"}
    assert _files(tmp_path / "streamed") == _files(tmp_path / "whole")
    drop = lambda layers: {k: {s: x for s, x in v.items() if s != "seconds"} for k, v in layers.items()}  # noqa: E731
    assert a["files_sha256"] == b["files_sha256"] and drop(a["layers"]) == drop(b["layers"])


def test_at_most_one_block_is_loaded_at_a_time(capsys, tmp_path, sharded_bf16, calib_txt, monkeypatch):
    """Memory does not grow with depth: while any block is loaded no other one is, during
    the layout check and during calibration alike."""
    from qtool import streaming

    loaded: set[int] = set()
    peak = []
    real_load, real_release = streaming.Streamed.load, streaming.Streamed.release

    def load(self, module, prefix):
        real_load(self, module, prefix)
        loaded.add(id(module))
        peak.append(len(loaded))

    def release(self, module):
        real_release(self, module)
        loaded.discard(id(module))

    monkeypatch.setattr(streaming.Streamed, "load", load)
    monkeypatch.setattr(streaming.Streamed, "release", release)
    res = run_cli(capsys, "quantize", sharded_bf16, "--method", "gptq", "--group-size", "32", "--calib", calib_txt,
                  "--nsamples", "4", "--seqlen", "32", "-o", tmp_path / "out")
    assert res.code == 0, res.err
    assert len(peak) == 6 and max(peak) == 1 and not loaded  # 3 blocks probed, then 3 quantized


def test_stream_refused_when_it_would_change_the_result(capsys, tmp_path, sharded_bf16):
    """A source whose float tensors are not all in the load dtype would be cast by
    transformers: ``--stream`` is refused naming why; auto falls back to loading whole."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "mixed"
    shutil.copytree(sharded_bf16, src)
    shard = sorted(src.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    save_file({k: v.float() for k, v in tensors.items()}, shard, metadata={"format": "pt"})
    res = run_cli(capsys, "quantize", src, "--method", "rtn", "--no-model-free", "--stream", "-o", tmp_path / "o1")
    assert res.code != 0 and "--stream: this model cannot be streamed" in res.err and "drop --stream" in res.err
    assert not (tmp_path / "o1").exists()
    res = run_cli(capsys, "quantize", src, "--method", "rtn", "--no-model-free", "-o", tmp_path / "o2")
    assert res.code == 0, res.err
    assert json.loads((tmp_path / "o2" / "qtool.json").read_text())["streamed"]["used"] is False


def test_nan_in_a_streamed_block_is_refused_before_calibration(capsys, tmp_path, sharded_bf16, calib_txt):
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "nan"
    shutil.copytree(sharded_bf16, src)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.2.mlp.down_proj.weight"
    shard = src / index[name]
    tensors = load_file(shard)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    res = run_cli(capsys, "quantize", src, "--method", "gptq", "--calib", calib_txt, "--nsamples", "4",
                  "--seqlen", "32", "-o", tmp_path / "out")
    assert res.code != 0 and name in res.err and "NaN or inf" in res.err
    assert "capturing" not in res.out + res.err and not (tmp_path / "out").exists()
