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


@pytest.mark.parametrize("fmt", ["gptq", "marlin"])
def test_check_and_packed_loading_sort_act_order_rows(capsys, tmp_path, mini_llama, monkeypatch, fmt):
    """A dynamic act-order GPTQ checkpoint (non-monotone g_idx on disk) reaches the kernel
    with its rows sorted by group: `qtool check` and packed loading pass a perm and no g_idx,
    and check still matches the reference computed from the file's own tensors."""
    from qtool.io import load_packed_model
    from qtool.kernels import PackedLinear, _launch

    out = tmp_path / fmt
    assert run_cli(capsys, "-q", "quantize", mini_llama, "--method", "gptq", "--act-order", "--dynamic-groups", "-g", "64",
                   "--nsamples", "4", "--seqlen", "32", "--format", fmt, "-o", out).code == 0
    on_disk = load_file(str(out / "model.safetensors"))
    g_idx = [t for name, t in on_disk.items() if name.endswith(".g_idx")]
    order = g_idx if fmt == "gptq" else [t for name, t in on_disk.items() if name.endswith(".perm")]
    assert order and any(bool((t[1:] < t[:-1]).any()) for t in order)  # really act-order

    seen, real = [], _launch.launch
    monkeypatch.setattr(_launch, "launch", lambda *a: seen.append(a[-1]) or real(*a))
    res = run_cli(capsys, "--json", "check", out, "--sample", "2")
    assert res.code == 0, res.err
    assert all(r["worst_rel_error"] < 1e-4 for r in res.json()["layers"])
    assert len(seen) == 2 and all(not c["HAS_G_IDX"] and c["HAS_PERM"] and c["GROUP_SIZE"] == 64 for c in seen)

    model = load_packed_model(out, kernel="torch")
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert layers and all("g_idx" not in m.packed_tensors() and "perm" in m.packed_tensors() for m in layers)
