"""The client matrix: every format x {sym, asym} x GPTQ act-order kind {off, static,
dynamic}, quantized by ``qtool quantize`` on a mini random-init llama, is either read by the
real client libraries installed here with qtool's own logits, or refused before the model
is loaded with a message naming options that work. ``MATRIX`` is the expected outcome of
every cell; the README's "Client matrix" table is generated from it (and checked here).

Clients run here:

* compressed-tensors (installed by the dev extra): its own config parser
  (``QuantizationConfig.model_validate`` on the written ``quantization_config``) and its
  decompressor (``PackedQuantizationCompressor.decompress`` on every quantized module of the
  saved state dict) must give qtool's float16 weights exactly.
* transformers ``AutoModelForCausalLM.from_pretrained`` of the checkpoint folder, logits
  against ``qtool.api.load_any`` on the same tokens: compressed-tensors checkpoints on
  transformers' own path (asymmetric ones with ``CompressedTensorsConfig(dequantize=True)``:
  the default path refuses packed zero points, upstream); GPTQ and AWQ checkpoints through
  transformers' GPTQ/AWQ loaders, which need ``optimum`` and ``gptqmodel``. Neither is in the
  dev extra (gptqmodel builds from source); without them those cells are skipped with that
  reason. To run them: ``python -m venv --system-site-packages /tmp/gm &&
  /tmp/gm/bin/pip install gptqmodel optimum -c <(printf 'torch==2.13.0\\ntransformers==5.24.0\\n')``
  then ``/tmp/gm/bin/python -m pytest tests/test_client_matrix.py``.

vLLM is not installable here (no GPU); the matrix's vLLM column is what vLLM's documented
loaders accept, not a run.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_mini_model
from helpers import run_cli

FORMATS = ("gptq", "awq", "marlin", "compressed-tensors")
KINDS = ("off", "static", "dynamic")
KIND_FLAGS = {"off": ["--no-act-order"], "static": ["--static-groups"], "dynamic": ["--dynamic-groups"]}
GROUP_SIZE = 128  # the one group size every format's loaders take (vLLM's serialized Marlin: 128 or -1)

HAS_CT = importlib.util.find_spec("compressed_tensors") is not None
HAS_GPTQMODEL = all(importlib.util.find_spec(m) is not None for m in ("gptqmodel", "optimum"))
NO_GPTQMODEL = ("transformers' GPTQ/AWQ loaders need gptqmodel and optimum, not installed "
                "(optional: see the module docstring)")
MARLIN_LEGACY = ("no client loads serialized Marlin here: transformers hands it to GPTQModel, whose Marlin "
                 "kernel is CUDA-only, and vLLM removed its `marlin` loader (vllm-project/vllm#23204)")
QTOOL_MARLIN = ("transformers skips the unknown quant_method 'qtool_marlin' with a warning and initialises "
                "the quantized linears randomly; no client reads zero-point or act-order Marlin")

# (format, weights) -> (outcome per kind, clients here, vLLM's documented loader)
# outcome: "loads" (written, read by the clients named), "qtool" (written, read by qtool
# only), or "refused: FLAGS" (refused before the model is loaded; FLAGS are options the
# message names that make it work)
MATRIX = {
    ("gptq", "sym"): ({"off": "loads", "static": "loads", "dynamic": "loads"},
                      "transformers + GPTQModel¹", "`gptq_marlin` (act-order via g_idx sort)"),
    ("gptq", "asym"): ({"off": "loads", "static": "loads", "dynamic": "loads"},
                       "transformers + GPTQModel¹", "`gptq` (`gptq_v2` zeros)"),
    ("awq", "sym"): ({kind: "refused: --asym" for kind in KINDS}, "–", "–"),
    ("awq", "asym"): ({"off": "loads", "static": "loads", "dynamic": "refused: --static-groups, --no-act-order"},
                      "transformers + GPTQModel¹", "`awq_marlin`, `awq`"),
    ("marlin", "sym"): ({"off": "qtool", "static": "qtool", "dynamic": "qtool"},
                        "qtool only²", "none: serialized `marlin` removed³"),
    ("marlin", "asym"): ({"off": "qtool", "static": "qtool", "dynamic": "qtool"},
                         "qtool only²", "none³"),
    ("compressed-tensors", "sym"): ({"off": "loads", "static": "loads", "dynamic": "refused: --static-groups, --no-act-order"},
                                    "compressed-tensors, transformers", "`compressed-tensors` (WNA16)"),
    ("compressed-tensors", "asym"): ({"off": "loads", "static": "loads", "dynamic": "refused: --static-groups, --no-act-order"},
                                     "compressed-tensors, transformers (`dequantize=True`)", "`compressed-tensors` (WNA16)"),
}
CELLS = [(fmt, w, kind) for (fmt, w) in MATRIX for kind in KINDS]


def default_kind(fmt: str) -> str:
    from qtool.pack import get_format

    return get_format(fmt).ACT_ORDER


def matrix_table() -> str:
    """The README's client matrix (markdown), generated from ``MATRIX``."""
    lines = ["| format | weights | no act-order | static act-order | dynamic act-order | loads here in | "
             "vLLM (documented, not run here) |", "|---|---|---|---|---|---|---|"]
    for (fmt, weights), (outcomes, here, vllm) in MATRIX.items():
        cells = []
        for kind in KINDS:
            text = {"loads": "✓", "qtool": "qtool only"}.get(outcomes[kind], outcomes[kind])
            if kind == default_kind(fmt) and not text.startswith("refused"):
                text += " (default)"
            cells.append(text)
        lines.append(f"| `{fmt}` | {weights} | {' | '.join(cells)} | {here} | {vllm} |")
    return "\n".join(lines)


def cell_args(fmt: str, weights: str, kind: str) -> list[str]:
    """``qtool quantize`` options of a cell; the format's default act-order kind is asked
    for with no flag at all, so the default itself is what the cell tests."""
    kind_flags = [] if kind == default_kind(fmt) else KIND_FLAGS[kind]
    return ["--method", "gptq", "-g", str(GROUP_SIZE), "--format", fmt, f"--{weights}", *kind_flags]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_model_dir) -> Path:
    """A one-block mini llama (7 linears; down_proj has k = 256, two groups of 128)."""
    return make_mini_model(tmp_path_factory.mktemp("matrix-model") / "llama", "llama", default_model_dir,
                           num_hidden_layers=1)


@pytest.fixture(scope="module")
def written(tmp_path_factory, model_dir):
    """``cell -> checkpoint folder``, quantized once per cell on first use."""
    root = tmp_path_factory.mktemp("matrix")
    calib = root / "calib.txt"
    calib.write_text("\n".join(f"Row {i}: the {i * 7 % 13} quick foxes jump over {i} lazy dogs." for i in range(200)))
    cache: dict[tuple[str, str, str], Path] = {}

    def get(capsys, cell) -> Path:
        if cell not in cache:
            out = root / "-".join(cell)
            res = run_cli(capsys, "--json", "quantize", model_dir, "-o", out, "--calib", calib, "--nsamples", "2",
                          "--seqlen", "32", "--batch-size", "2", *cell_args(*cell))
            assert res.code == 0, res.err
            cache[cell] = out
        return cache[cell]

    return get


def ids_for(ckpt: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    text = "The client matrix: every format either loads in its clients or is refused before any work."
    return AutoTokenizer.from_pretrained(ckpt)(text, return_tensors="pt").input_ids  # [1, T]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids, use_cache=False).logits.float()


def assert_logits_match(theirs: torch.Tensor, ours: torch.Tensor) -> None:
    diff = (theirs - ours).abs().max().item()
    assert diff <= 2e-3 * max(1.0, ours.abs().max().item()), diff


@pytest.mark.parametrize("fmt,weights,kind", CELLS)
def test_quantize_writes_or_refuses_before_loading(capsys, tmp_path, monkeypatch, written, model_dir,
                                                   fmt, weights, kind):
    """A refused cell stops before the model is loaded (loading would raise here), writes
    nothing and names the fix; a written cell records its act-order kind, and its g_idx is
    non-monotone exactly for dynamic act-order."""
    import qtool.api
    from qtool.io import read_quantized_layers

    outcome = MATRIX[fmt, weights][0][kind]
    if outcome.startswith("refused"):
        def no_loading(*args, **kwargs):
            raise AssertionError("the model was loaded before the refusal")

        monkeypatch.setattr(qtool.api, "load_model", no_loading)
        out = tmp_path / "refused"
        res = run_cli(capsys, "quantize", model_dir, "-o", out, *cell_args(fmt, weights, kind))
        assert res.code == 1, res.err
        assert res.err.startswith(f"qtool: error: --format {fmt}") and len(res.err.strip().splitlines()) == 1, res.err
        for flag in outcome.removeprefix("refused: ").split(", "):
            assert flag in res.err, (flag, res.err)
        assert not out.exists() and not list(tmp_path.iterdir())
        return
    ckpt = written(capsys, (fmt, weights, kind))
    record = json.loads((ckpt / "qtool.json").read_text())
    assert record["config"]["act_order_kind"] == kind and record["config"]["sym"] == (weights == "sym")
    qweights, _, _, _ = read_quantized_layers(ckpt)
    non_monotone = [name for name, qw in qweights.items()
                    if qw.g_idx is not None and bool((qw.g_idx[1:] < qw.g_idx[:-1]).any())]
    if kind == "dynamic":
        assert non_monotone  # down_proj (k = 256) has two groups
    else:
        assert all(qw.g_idx is None for qw in qweights.values())


@pytest.mark.skipif(not HAS_CT, reason="compressed-tensors is not installed (pip install -e '.[dev]')")
@pytest.mark.parametrize("weights,kind", [(w, k) for (fmt, w, k) in CELLS
                                          if fmt == "compressed-tensors" and MATRIX[fmt, w][0][k] == "loads"])
def test_compressed_tensors_parses_and_decompresses(capsys, written, weights, kind):
    """compressed-tensors' own config parser accepts the written config (static act-order as
    ``actorder "weight"``), and its decompressor turns every saved module into qtool's
    float16 weights exactly."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    from qtool.io import read_quantized_layers

    ckpt = written(capsys, ("compressed-tensors", weights, kind))
    parsed = QuantizationConfig.model_validate(json.loads((ckpt / "config.json").read_text())["quantization_config"])
    scheme = parsed.config_groups["group_0"]
    assert scheme.weights.actorder == ("weight" if kind == "static" else None)
    assert (scheme.weights.symmetric, scheme.weights.group_size) == (weights == "sym", GROUP_SIZE)
    state = load_file(str(ckpt / "model.safetensors"))
    qweights, _, _, _ = read_quantized_layers(ckpt)
    assert len(qweights) == 7
    for name, qw in qweights.items():
        module = {key.removeprefix(f"{name}."): t for key, t in state.items() if key.startswith(f"{name}.")}
        restored = PackedQuantizationCompressor.decompress(module, scheme)["weight"]
        assert torch.equal(restored, qw.dequantize(torch.float16)), name


def _transformers_case(fmt: str, weights: str, kind: str):
    outcome = MATRIX[fmt, weights][0][kind]
    if outcome == "qtool":
        legacy = weights == "sym" and kind != "dynamic"
        return pytest.param(fmt, weights, kind, marks=pytest.mark.skip(reason=MARLIN_LEGACY) if legacy else
                            pytest.mark.xfail(strict=True, reason=QTOOL_MARLIN))
    if fmt in ("gptq", "awq"):
        return pytest.param(fmt, weights, kind, marks=pytest.mark.skipif(not HAS_GPTQMODEL, reason=NO_GPTQMODEL))
    return pytest.param(fmt, weights, kind)


@pytest.mark.parametrize("fmt,weights,kind", [_transformers_case(*cell) for cell in CELLS
                                              if not MATRIX[cell[:2]][0][cell[2]].startswith("refused")])
def test_transformers_loads_with_qtool_logits(capsys, written, fmt, weights, kind):
    """``AutoModelForCausalLM.from_pretrained`` on the checkpoint gives qtool's logits."""
    from transformers import AutoModelForCausalLM

    from qtool.api import load_any

    ckpt = written(capsys, (fmt, weights, kind))
    ids = ids_for(ckpt)
    kwargs, dtype = {}, torch.float32
    if fmt == "compressed-tensors" and weights == "asym":
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    elif fmt in ("gptq", "awq"):
        # GPTQModel's pure-torch kernels (float16 only); its auto-selected CPU kernel computes in bfloat16
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
        from transformers import AwqConfig, GPTQConfig

        kwargs["quantization_config"] = (GPTQConfig(bits=4, backend="torch") if fmt == "gptq"
                                         else AwqConfig(bits=4, backend="torch_awq"))
        dtype = torch.float16
    theirs = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, device_map="cpu", **kwargs).eval()
    ours, _, _ = load_any(str(ckpt), dtype=dtype)
    assert_logits_match(logits(theirs, ids), logits(ours, ids))


def test_default_act_order_kind_follows_the_format():
    """No act-order flag: dynamic for gptq, static where the clients take no g_idx; an
    explicit kind is kept; other methods have none."""
    from qtool.config import QuantizeConfig

    for fmt in FORMATS:
        assert QuantizeConfig(format=fmt).act_order_kind == default_kind(fmt)
        assert QuantizeConfig(format=fmt, static_groups=False).act_order_kind == "dynamic"
        assert QuantizeConfig(format=fmt, act_order=False).act_order_kind == "off"
        assert QuantizeConfig(method="rtn", format=fmt).act_order_kind == "off"
    assert [default_kind(f) for f in FORMATS] == ["dynamic", "static", "dynamic", "static"]
    # replace() resolves an automatic kind again; an explicit one is kept
    assert QuantizeConfig().replace(format="compressed-tensors").act_order_kind == "static"
    assert QuantizeConfig(format="compressed-tensors").replace(method="rtn").act_order_kind == "off"
    assert QuantizeConfig(static_groups=False).replace(format="awq").act_order_kind == "dynamic"


def test_readme_client_matrix_is_the_tested_one():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert matrix_table() in readme, "README 'Client matrix' differs from tests/test_client_matrix.py:matrix_table()"
