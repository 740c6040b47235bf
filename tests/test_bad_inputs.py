"""The bad-input matrix: each case is one line `qtool: error: ...` naming the problem and
the fix, a non-zero exit, and nothing left under the output path."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import WIKITEXT_TEST
from helpers import run_cli


def assert_fails(res, out: Path | None, *needles: str, code: int = 1):
    assert res.code == code, (res.code, res.err)
    errors = [ln for ln in res.err.strip().splitlines() if ln.startswith("qtool: error:")]
    assert len(errors) == 1, res.err
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert "Traceback" not in res.err
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def quantize(capsys, model, out, *extra):
    return run_cli(capsys, "quantize", model, "-o", out, *extra)


@pytest.fixture()
def model_copy(tmp_path, mini_llama) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(mini_llama, dst)
    return dst


def test_corrupt_safetensors(capsys, tmp_path, model_copy):
    path = model_copy / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert_fails(quantize(capsys, model_copy, tmp_path / "out", "--method", "rtn"), tmp_path / "out", "corrupt or truncated")


def test_truncated_safetensors(capsys, tmp_path, model_copy):
    path = model_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_fails(quantize(capsys, model_copy, tmp_path / "out", "--method", "rtn"), tmp_path / "out", "truncated")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_weights(capsys, tmp_path, model_copy, value):
    path = model_copy / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = value
    save_file(tensors, str(path), metadata={"format": "pt"})
    res = quantize(capsys, model_copy, tmp_path / "out", "--method", "gptq")
    assert_fails(res, tmp_path / "out", "model.layers.1.mlp.up_proj.weight", "NaN or inf")
    assert not (tmp_path / "out.qtool-work").exists()  # failed before any work started


@pytest.mark.parametrize("args,needle", [
    (["--bits", "3"], "--bits 3"),
    (["--group-size", "48"], "--group-size 48"),
    (["--method", "foo"], "unknown --method"),
    (["--format", "exl2"], "unknown format"),
    (["--method", "rtn", "--static-groups"], "--static-groups"),
    (["--format", "awq", "--sym"], "--format awq"),
    (["--format", "awq", "--method", "gptq", "--asym", "--act-order", "--dynamic-groups"], "--format awq"),
    (["--format", "marlin", "--bits", "8"], "--format marlin"),
    (["--damp", "0"], "--damp"),
    (["--nsamples", "0"], "--nsamples"),
    (["--dtype", "int4"], "--dtype int4"),
])
def test_unsupported_options(capsys, tmp_path, mini_llama, args, needle):
    assert_fails(quantize(capsys, mini_llama, tmp_path / "out", *args), tmp_path / "out", needle)


@pytest.mark.parametrize("content,name,needle", [
    ("short text", "c.txt", "too short"),
    (b"caf\xe9 latin-1 bytes " * 50, "c.txt", "not UTF-8"),
    ('{"txt": "wrong field"}\n', "c.jsonl", "'text' string or an 'input_ids' list"),
    ('{"text": "ok"}\nnot json\n', "c.jsonl", "not valid JSON"),
    ('{"input_ids": [1, 2, 3]}\n', "c.jsonl", "fewer than --nsamples"),
    ("text", "c.csv", "must end in .txt, .jsonl or .parquet"),
])
def test_bad_calibration(capsys, tmp_path, mini_llama, content, name, needle):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    res = quantize(capsys, mini_llama, tmp_path / "out", "--method", "gptq", "--calib", path, "--seqlen", "64")
    assert_fails(res, tmp_path / "out", needle)


def test_eval_dataset_shorter_than_one_window(capsys, tmp_path, mini_llama):
    path = tmp_path / "tiny.txt"
    path.write_text("only a few words")
    res = run_cli(capsys, "eval", mini_llama, "--dataset", path, "--seqlen", "128")
    assert_fails(res, None, "fewer than one window", "--seqlen")


def test_eval_empty_dataset_and_long_seqlen(capsys, tmp_path, mini_llama):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_fails(run_cli(capsys, "eval", mini_llama, "--dataset", empty), None, "empty")
    assert_fails(run_cli(capsys, "eval", mini_llama, "--dataset", WIKITEXT_TEST, "--seqlen", "4096"), None,
                 "longer than the model's context")


def test_eval_different_tokenizers(capsys, tmp_path, mini_llama, model_copy):
    cfg = json.loads((model_copy / "tokenizer.json").read_text())
    cfg["model"]["vocab"]["zzz-extra-token"] = len(cfg["model"]["vocab"])
    (model_copy / "tokenizer.json").write_text(json.dumps(cfg))
    res = run_cli(capsys, "eval", mini_llama, model_copy, "--dataset", WIKITEXT_TEST, "--seqlen", "64", "--max-windows", "1")
    assert_fails(res, None, "different tokenizers")


def test_output_parent_missing_or_a_file(capsys, tmp_path, mini_llama):
    assert_fails(quantize(capsys, mini_llama, tmp_path / "no" / "such" / "out", "--method", "rtn"), None, "does not exist")
    (tmp_path / "afile").write_text("x")
    assert_fails(quantize(capsys, mini_llama, tmp_path / "afile" / "out", "--method", "rtn"), None, "does not exist")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_output_not_writable(capsys, tmp_path, mini_llama):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    assert_fails(quantize(capsys, mini_llama, ro / "out", "--method", "rtn"), ro / "out", "cannot write")


def test_checkpoint_from_newer_qtool(capsys, tmp_path, mini_llama):
    out = tmp_path / "ckpt"
    assert quantize(capsys, mini_llama, out, "--method", "rtn", "-q").code == 0
    record = json.loads((out / "qtool.json").read_text())
    record["qtool_version"] = "99.0.0"
    (out / "qtool.json").write_text(json.dumps(record))
    assert_fails(run_cli(capsys, "inspect", out), None, "newer than this qtool", "upgrade")
    assert_fails(run_cli(capsys, "eval", out, "--dataset", WIKITEXT_TEST, "--seqlen", "64"), None, "newer than this qtool")


def test_interrupt_during_save_leaves_nothing_then_resume_finishes(tmp_path, mini_llama, calib_txt, monkeypatch):
    """A Ctrl-C while shards are written: no output, no temporary folder, the work folder
    stays and --resume writes the checkpoint without redoing any block."""
    import qtool.io
    from qtool.api import quantize as api_quantize
    from qtool.config import QuantizeConfig

    out = tmp_path / "out"
    config = QuantizeConfig(method="gptq", calib=str(calib_txt), nsamples=4, seqlen=64)
    real = qtool.io._write_entries

    def interrupted(entries, folder, size):
        real(entries, folder, size)
        raise KeyboardInterrupt

    monkeypatch.setattr(qtool.io, "_write_entries", interrupted)
    with pytest.raises(KeyboardInterrupt):
        api_quantize(str(mini_llama), out, config)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    assert (tmp_path / "out.qtool-work" / "block-0001").is_dir()  # both blocks committed
    monkeypatch.setattr(qtool.io, "_write_entries", real)
    record = api_quantize(str(mini_llama), out, config, resume=True)
    assert record["resumed_from_block"] == 2 and (out / "model.safetensors").is_file()


def test_unreadable_or_missing_eval_model(capsys, tmp_path):
    assert_fails(run_cli(capsys, "eval", tmp_path / "missing", "--dataset", WIKITEXT_TEST), None, "does not exist")
