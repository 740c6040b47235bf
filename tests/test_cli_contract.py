"""The machine-readable contract: every command's --json output validates against
schemas/qtool-output.schema.json, and every combination of quantize options either works
or fails with a documented one-line error before any calibration work (hypothesis)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, WIKITEXT_TEST
from helpers import run_cli

jsonschema = pytest.importorskip("jsonschema")
SCHEMA = json.loads((ROOT / "schemas" / "qtool-output.schema.json").read_text())


def validate(obj) -> None:
    jsonschema.validate(obj, SCHEMA)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, mini_llama):
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("contract") / "ckpt"
    subprocess.run([sys.executable, "-m", "qtool", "-q", "quantize", str(mini_llama), "--method", "rtn", "-o", str(out)],
                   check=True)
    return out


def test_quantize_json_validates(capsys, tmp_path, mini_llama, calib_txt):
    res = run_cli(capsys, "--json", "quantize", mini_llama, "--method", "gptq", "--calib", calib_txt,
                  "--nsamples", "4", "--seqlen", "64", "-o", tmp_path / "o")
    assert res.code == 0, res.err
    validate(res.json())


def test_eval_inspect_check_json_validate(capsys, ckpt, mini_llama):
    for args in (["eval", ckpt, "--baseline", mini_llama, "--dataset", WIKITEXT_TEST, "--seqlen", "64", "--max-windows", "1"],
                 ["inspect", ckpt, "--verify"],
                 ["check", ckpt, "--sample", "1", "--kernel", "torch"]):
        res = run_cli(capsys, "--json", *args)
        assert res.code == 0, res.err
        validate(res.json())


def test_error_json_validates(capsys, tmp_path):
    res = run_cli(capsys, "--json", "quantize", tmp_path / "missing", "-o", tmp_path / "o")
    assert res.code == 1
    validate(res.json())
    assert res.json()["error"]["exit_code"] == 1


DOCUMENTED = ("--bits", "--group-size", "--format", "--static-groups", "--gptq-version", "calibration file")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["rtn", "gptq", "awq"]), fmt=st.sampled_from(["gptq", "awq", "marlin", "compressed-tensors"]),
       bits=st.sampled_from(["4", "8"]), group=st.sampled_from(["-1", "32", "64", "128", "0"]),
       sym=st.sampled_from(["--sym", "--asym", None]), act=st.sampled_from(["--act-order", "--no-act-order"]),
       static=st.booleans(), version=st.sampled_from(["0", "1", "2"]))
def test_option_combinations_fail_early_or_work(capsys, tmp_path_factory, mini_llama, method, fmt, bits, group, sym,
                                                act, static, version):
    out = tmp_path_factory.mktemp("combo") / "out"
    args = ["quantize", mini_llama, "--method", method, "--format", fmt, "--bits", bits, "--group-size", group, act,
            "--gptq-version", version, "--calib", out.parent / "no-such-calibration.txt", "-o", out]
    args += [sym] if sym else []
    args += ["--static-groups"] if static else []
    res = run_cli(capsys, *args)
    if res.code == 0:
        assert method == "rtn" and (out / "qtool.json").is_file()
        return
    assert res.code == 1, res.err  # never a usage slip or an internal error with a traceback
    assert "Traceback" not in res.err
    line = res.err.strip().splitlines()[-1]
    assert line.startswith("qtool: error:") and any(d in line for d in DOCUMENTED), line
    # the calibration file is only looked at after every option check passed
    assert not (out.parent / f"{out.name}.qtool-work").exists() or "calibration file" in line
    assert not out.exists()
