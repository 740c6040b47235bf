"""Reliability for CI use: interrupt (SIGINT, SIGKILL) and resume to byte-identical
files, byte-identical reruns, sha256 verification."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qtool.resume import WorkDir

from conftest import make_mini_model
from helpers import file_digests, run_cli


@pytest.fixture(scope="module")
def deep_mini(tmp_path_factory, default_model_dir):
    return make_mini_model(tmp_path_factory.mktemp("deep") / "m", "llama", default_model_dir, num_hidden_layers=5)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cal") / "c.txt"
    path.write_text("\n".join(f"Line {i}: numbers {i * 31 % 97} and words about item {i}." for i in range(600)))
    return path


def quantize_cmd(model, out, calib, *extra):
    return [sys.executable, "-m", "qtool", "-q", "quantize", str(model), "--method", "gptq", "-g", "64",
            "--calib", str(calib), "--nsamples", "8", "--seqlen", "64", "-o", str(out), *extra]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, deep_mini, calib_file):
    out = tmp_path_factory.mktemp("ref") / "out"
    subprocess.run(quantize_cmd(deep_mini, out, calib_file), check=True)
    return out


def _interrupt(cmd, out: Path, sig: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "QTOOL_TEST_BLOCK_DELAY": "0.5"}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    second = out.parent / f"{out.name}.qtool-work" / "block-0001"  # committed: two blocks done
    deadline = time.time() + 120
    while time.time() < deadline:
        if second.is_dir():
            break
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, "", err)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupt_then_resume_is_byte_identical(tmp_path, deep_mini, calib_file, reference_run, sig):
    out = tmp_path / "out"
    cmd = quantize_cmd(deep_mini, out, calib_file)
    res = _interrupt(cmd, out, sig)
    if sig == signal.SIGINT:
        assert res.returncode == 130, res.stderr
        assert "--resume" in res.stderr
    else:
        assert res.returncode == -signal.SIGKILL
    assert not out.exists()  # nothing half-written under the output path
    work = tmp_path / "out.qtool-work"
    assert 2 <= WorkDir(work).next_block < 5
    subprocess.run(cmd + ["--resume"], check=True)
    assert file_digests(out) == file_digests(reference_run)
    assert not work.exists()  # cleaned up after success
    assert json.loads((out / "qtool.json").read_text())["resumed_from_block"] >= 2


def test_rerun_gives_identical_files(tmp_path, deep_mini, calib_file, reference_run):
    out = tmp_path / "again"
    subprocess.run(quantize_cmd(deep_mini, out, calib_file), check=True)
    assert file_digests(out) == file_digests(reference_run)


def test_resume_refuses_a_different_run(capsys, tmp_path, deep_mini, calib_file):
    out = tmp_path / "out"
    res = _interrupt(quantize_cmd(deep_mini, out, calib_file), out, signal.SIGINT)
    assert res.returncode == 130
    changed = run_cli(capsys, "quantize", deep_mini, "--method", "gptq", "-g", "32", "--calib", calib_file,
                      "--nsamples", "8", "--seqlen", "64", "-o", out, "--resume")
    assert changed.code == 1 and "option group_size" in changed.err and "differ" in changed.err
    nothing = run_cli(capsys, "quantize", deep_mini, "--method", "rtn", "-o", tmp_path / "other", "--resume")
    assert nothing.code == 1 and "nothing to resume" in nothing.err


def test_resume_after_an_upgrade_that_added_options(capsys, tmp_path, deep_mini, calib_file, reference_run):
    """A work folder written before an option existed (its fingerprint lacks the option)
    resumes when the option is left at its default, the behaviour that run had, and gives
    the uninterrupted run's files; set to anything else, the option is named as differing."""
    out = tmp_path / "out"
    assert _interrupt(quantize_cmd(deep_mini, out, calib_file), out, signal.SIGINT).returncode == 130
    fp_file = tmp_path / "out.qtool-work" / "fingerprint.json"
    fp = json.loads(fp_file.read_text())
    for added in ("bits_budget", "layer_bits", "scale_search"):
        del fp["config"][added]
    fp_file.write_text(json.dumps(fp))
    changed = run_cli(capsys, "quantize", deep_mini, "--method", "gptq", "-g", "64", "--calib", calib_file,
                      "--nsamples", "8", "--seqlen", "64", "-o", out, "--resume", "--scale-search", "mse")
    assert changed.code == 1 and "option scale_search differ" in changed.err
    subprocess.run(quantize_cmd(deep_mini, out, calib_file, "--resume"), check=True)
    assert file_digests(out) == file_digests(reference_run)


def test_inspect_verify_detects_modified_file(capsys, tmp_path, reference_run):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(reference_run, copy)
    assert run_cli(capsys, "inspect", copy, "--verify").code == 0
    with open(copy / "config.json", "a") as f:
        f.write(" ")
    res = run_cli(capsys, "inspect", copy, "--verify")
    assert res.code == 1 and "config.json" in res.out
