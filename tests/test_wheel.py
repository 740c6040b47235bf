"""A normal install runs the default command: the wheel built from the repository holds
every module and everything qtool reads at run time (the bundled calibration text, the
JSON schema of ``--json`` output), and qtool installed from it into a fresh virtual
environment, run from a folder outside the source tree, quantizes with the default method
on the bundled calibration text.

The virtual environment reuses this interpreter's torch and transformers
(``--system-site-packages``, no network) but gets qtool from the wheel; the test checks
that the wheel's copy is the one imported, not the editable source tree.
Select it alone with ``-m wheel``; it is part of the normal suite."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, make_mini_model

pytestmark = pytest.mark.wheel

# what the build reads; the copy keeps stale build/ or egg-info folders of the checkout out of the wheel
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "src", "calib_data", "schemas")


def _run(args: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    res = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, args))} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    tree = root / "tree"
    tree.mkdir()
    for name in BUILD_INPUTS:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, tree / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", tree,
          "-w", root / "dist"], cwd=root)
    (found,) = (root / "dist").glob("qtool-*.whl")
    return found


@pytest.fixture(scope="module")
def venv_python(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed (pip comes from this interpreter's
    site-packages, like torch; ``--ignore-installed`` so the editable install does not count)."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd=venv.parent)
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel],
         cwd=venv.parent)
    return python


def test_wheel_holds_every_module_and_the_run_time_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {f"qtool/{p.relative_to(ROOT / 'src' / 'qtool').as_posix()}"
               for p in (ROOT / "src" / "qtool").rglob("*.py") if "__pycache__" not in p.parts}
    assert modules - names == set(), "modules missing from the wheel (setup.py packages)"
    texts = {f"qtool/calib_data/{p.name}" for p in (ROOT / "calib_data").glob("*.txt")}
    assert texts and texts <= names, texts - names
    assert "qtool/schemas/qtool-output.schema.json" in names
    schema = json.loads(zipfile.ZipFile(wheel).read("qtool/schemas/qtool-output.schema.json"))
    assert schema == json.loads((ROOT / "schemas" / "qtool-output.schema.json").read_text())


def test_installed_wheel_quantizes_with_the_bundled_calibration(venv_python, tmp_path, default_model_dir):
    """Default method (GPTQ) and the bundled calibration text, from the wheel, outside the
    source tree; the calibration tokens equal the source tree's for the same settings."""
    from transformers import AutoTokenizer

    from qtool.calib import load_calibration

    work = tmp_path / "elsewhere"
    work.mkdir()
    probe = _run([venv_python, "-c", "import json, qtool, qtool.calib as c; "
                  "print(json.dumps({'module': qtool.__file__, 'calib': str(c.bundled_calib_dir())}))"], cwd=work)
    where = json.loads(probe.stdout)
    env_root = venv_python.parent.parent.resolve()
    assert Path(where["module"]).resolve().is_relative_to(env_root), where  # the wheel, not the editable source
    assert Path(where["calib"]).resolve().is_relative_to(env_root), where

    model = make_mini_model(tmp_path / "mini", "llama", default_model_dir, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    res = _run([venv_python.parent / "qtool", "--json", "quantize", model, "-o", work / "out",
                "--nsamples", "2", "--seqlen", "64"], cwd=work)
    record = json.loads(res.stdout)
    assert record["config"]["method"] == "gptq" and (work / "out" / "qtool.json").is_file()
    cal = record["calibration"]
    assert cal["source"] == "bundled:calib_data" and cal["nsamples"] == 2 and cal["seqlen"] == 64
    here = load_calibration(None, AutoTokenizer.from_pretrained(model), 2, 64, 0)
    assert cal["tokens_sha256"] == here.sha256
