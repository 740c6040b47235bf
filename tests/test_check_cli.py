"""``qtool check``: the kernel (Triton interpreter on CPU) against the reference on a
checkpoint's layers; a corrupt layer makes it fail with exit 1."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports the kernels

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file

from helpers import run_cli  # noqa: E402

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def rtn_ckpt(tmp_path_factory, mini_llama):
    from qtool.cli import main  # noqa: F401 - import before the capsys-free run below
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("check") / "ckpt"
    subprocess.run([sys.executable, "-m", "qtool", "-q", "quantize", str(mini_llama), "--method", "rtn", "-g", "64",
                    "-o", str(out)], check=True)
    return out


@pytest.mark.parametrize("fmt", ["gptq", "marlin"])
def test_check_passes_on_a_checkpoint(capsys, tmp_path, mini_llama, fmt):
    out = tmp_path / fmt
    assert run_cli(capsys, "-q", "quantize", mini_llama, "--method", "rtn", "-g", "128", "--format", fmt, "-o", out).code == 0
    res = run_cli(capsys, "--json", "check", out, "--sample", "2")
    assert res.code == 0, res.err
    data = res.json()
    assert data["ok"] and data["layers_checked"] == 2 and data["kernel"] == "triton"
    assert all(r["worst_rel_error"] < 1e-4 for r in data["layers"])


def test_check_fails_on_a_corrupt_layer(capsys, tmp_path, rtn_ckpt):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(rtn_ckpt, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    for name in list(tensors):
        if name.endswith(".scales"):
            tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    res = run_cli(capsys, "check", bad, "--sample", "1")
    assert res.code == 1 and "differ from the reference" in res.err
