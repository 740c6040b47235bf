"""``qtool convert`` on whole checkpoints of mini models: for every pair of formats that can
hold the same quantized weights, A -> B -> A gives byte-identical safetensors (and the same
config.json), B written by conversion equals B written by conversion from any other format,
and the dequantized weights are identical in every format; impossible or lossy
conversions are refused with one line before anything is written."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_mini_model
from helpers import run_cli
from safetensors.torch import load_file, save_file

from qtool.errors import UnsupportedError

# target name -> (format, gptq version)
TARGETS = {
    "gptq-v1": ("gptq", 1),
    "gptq-v2": ("gptq", 2),
    "awq": ("awq", None),
    "marlin": ("marlin", None),
    "compressed-tensors": ("compressed-tensors", None),
}
# variant -> (mini family, quantize options, the targets that hold it exactly: first the gptq
# version quantize writes by default, then the other formats, last the other gptq version)
VARIANTS = {
    "sym-g128": ("llama", {"method": "rtn", "group_size": 128, "sym": True},
                 ["gptq-v1", "marlin", "compressed-tensors", "gptq-v2"]),
    "asym-g64-bias": ("qwen2", {"method": "rtn", "group_size": 64, "sym": False},
                      ["gptq-v2", "awq", "marlin", "compressed-tensors", "gptq-v1"]),
    "sym-g64-act-order": ("llama", {"method": "gptq", "group_size": 64, "sym": True, "act_order": True,
                                   "nsamples": 4, "seqlen": 32},
                          ["gptq-v1", "marlin", "gptq-v2"]),  # compressed-tensors >= 0.20: no dynamic act-order
    "sym8-channel": ("llama", {"method": "rtn", "bits": 8, "group_size": -1, "sym": True},
                     ["gptq-v1", "compressed-tensors", "gptq-v2"]),
}
# every pair of formats, plus gptq v1 <-> v2 (the zero storage option of one format)
PAIRS = [(v, a, b) for v, (_, _, held) in VARIANTS.items()
         for a, b in [*itertools.combinations(held[:-1], 2), (held[0], held[-1])]]
REFUSED = [(v, t) for v, (_, _, held) in VARIANTS.items() for t in TARGETS if t not in held]


def digests(folder: Path) -> dict[str, str]:
    from qtool.io import sha256_file

    return {f.name: sha256_file(f) for f in sorted(folder.glob("*.safetensors"))}


def convert(src: Path, target: str, out: Path, **kw) -> dict:
    from qtool.convert import convert_checkpoint

    fmt, version = TARGETS[target]
    return convert_checkpoint(src, fmt, out, gptq_version=version, **kw)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, default_model_dir) -> dict[str, dict[str, Path]]:
    """variant -> {"base": the quantized checkpoint, target: base converted to target}, on
    one-block mini models (7 quantized linears) to keep the many conversions quick."""
    from qtool.api import quantize
    from qtool.config import QuantizeConfig

    root = tmp_path_factory.mktemp("convert")
    models = {fam: make_mini_model(root / fam, fam, default_model_dir, num_hidden_layers=1) for fam in ("llama", "qwen2")}
    calib = root / "calib.txt"
    calib.write_text("\n".join(f"Sample {i}: the quick brown fox {i * 7 % 13} jumps over {i} lazy dogs." for i in range(200)))
    out = {}
    for variant, (family, options, held) in VARIANTS.items():
        config = QuantizeConfig(**options, calib=str(calib) if options["method"] == "gptq" else None)
        (root / variant).mkdir()
        quantize(str(models[family]), root / variant / "base", config, device="cpu")
        out[variant] = {"base": root / variant / "base"}
        for target in held:
            convert(out[variant]["base"], target, root / variant / target)
            out[variant][target] = root / variant / target
    return out


@pytest.mark.parametrize("variant,a,b", PAIRS)
def test_a_to_b_to_a_is_byte_identical(tmp_path, checkpoints, variant, a, b):
    ckpt = checkpoints[variant]
    convert(ckpt[a], b, tmp_path / "b")
    assert digests(tmp_path / "b") == digests(ckpt[b])  # B does not depend on where it came from
    convert(tmp_path / "b", a, tmp_path / "a")
    assert digests(tmp_path / "a") == digests(ckpt[a])
    assert (tmp_path / "a" / "config.json").read_bytes() == (ckpt[a] / "config.json").read_bytes()
    record = json.loads((tmp_path / "a" / "qtool.json").read_text())
    assert [e["format"] for e in record["converted_from"]] == ["gptq", TARGETS[a][0], TARGETS[b][0]]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dequantized_weights_identical_in_every_format(checkpoints, variant):
    from qtool.io import read_quantized_layers

    held = VARIANTS[variant][2]
    ref_q, ref_plain, _, _ = read_quantized_layers(checkpoints[variant]["base"])
    assert len(ref_q) == 7
    if variant == "asym-g64-bias":
        assert all(ref_q[n].bias is not None for n in ref_q if n.endswith(("q_proj", "k_proj", "v_proj")))
    if variant == "sym-g64-act-order":
        assert all(qw.g_idx is not None for qw in ref_q.values())
    for target in held:
        q, plain, fmt, _ = read_quantized_layers(checkpoints[variant][target])
        assert fmt == TARGETS[target][0]
        assert q.keys() == ref_q.keys() and plain.keys() == ref_plain.keys()
        for name, qw in ref_q.items():
            assert q[name].equal(qw), (target, name)
            assert torch.equal(q[name].dequantize(), qw.dequantize()), (target, name)
        assert all(torch.equal(plain[k], ref_plain[k]) for k in plain)


def test_conversion_to_the_same_format_equals_the_quantized_checkpoint(checkpoints):
    assert digests(checkpoints["sym-g128"]["gptq-v1"]) == digests(checkpoints["sym-g128"]["base"])
    assert digests(checkpoints["asym-g64-bias"]["gptq-v2"]) == digests(checkpoints["asym-g64-bias"]["base"])


def test_provenance_is_kept_and_extended(checkpoints):
    base = json.loads((checkpoints["asym-g64-bias"]["base"] / "qtool.json").read_text())
    conv = json.loads((checkpoints["asym-g64-bias"]["awq"] / "qtool.json").read_text())
    assert conv["format"] == "awq" and conv["config"]["format"] == "awq" and conv["format_options"] == {}
    for key in ("model", "calibration", "layers", "seed"):
        assert conv[key] == base[key]
    (entry,) = conv["converted_from"]
    assert entry["format"] == "gptq" and entry["format_options"] == {"version": 2}
    assert entry["files_sha256"]["model.safetensors"] == base["files_sha256"]["model.safetensors"]
    assert (checkpoints["asym-g64-bias"]["awq"] / "tokenizer.json").is_file()
    qcfg = json.loads((checkpoints["asym-g64-bias"]["awq"] / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "awq" and qcfg["group_size"] == 64


@pytest.mark.parametrize("variant,target", REFUSED)
def test_refused_before_writing(tmp_path, checkpoints, variant, target):
    with pytest.raises(UnsupportedError, match=f"cannot convert .* to {TARGETS[target][0]}: "):
        convert(checkpoints[variant]["base"], target, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory, default_model_dir) -> Path:
    """Asymmetric per-channel gptq v2 of a mini llama with intermediate 192 (down_proj k=192,
    not a Marlin kernel shape) and one all-positive row (its zero is 0: no GPTQ v1 field)."""
    from qtool.api import quantize
    from qtool.config import QuantizeConfig

    root = tmp_path_factory.mktemp("odd")
    folder = make_mini_model(root / "model", "llama", default_model_dir, intermediate_size=192)
    state = load_file(str(folder / "model.safetensors"))
    key = "model.layers.0.self_attn.o_proj.weight"
    state[key][3] = state[key][3].abs()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    quantize(str(folder), root / "ckpt", QuantizeConfig(method="rtn", group_size=-1, sym=False), device="cpu")
    return root / "ckpt"


@pytest.mark.parametrize("args,expected", [
    (["--to", "gptq", "--gptq-version", "1"],
     "model.layers.0.self_attn.o_proj: gptq: 1 asymmetric zero point(s) equal 0, which GPTQ v1 cannot store"),
    (["--to", "marlin"], "2 of 14 layers do not fit, e.g. model.layers.0.mlp.down_proj: k=192 is not a multiple of 128"),
    (["--to", "awq"], "AWQ needs a positive group size"),
    (["--to", "compressed-tensors", "--gptq-version", "2"], "--gptq-version only applies to --to gptq"),
    (["--to", "gguf"], "unknown format 'gguf'"),
])
def test_cli_refusals_are_one_line(capsys, tmp_path, odd_checkpoint, args, expected):
    res = run_cli(capsys, "-q", "convert", odd_checkpoint, *args, "-o", tmp_path / "out")
    assert res.code == 1, res.err
    assert expected in res.err and len(res.err.strip().splitlines()) == 1, res.err
    assert "Traceback" not in res.err
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder left behind


def test_cli_convert_and_reconvert(capsys, tmp_path, odd_checkpoint):
    res = run_cli(capsys, "--json", "convert", odd_checkpoint, "--to", "compressed-tensors", "-o", tmp_path / "ct")
    assert res.code == 0, res.err
    assert res.json()["format"] == "compressed-tensors"
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(res.json(), json.loads((ROOT / "schemas" / "qtool-output.schema.json").read_text()))
    again = run_cli(capsys, "convert", tmp_path / "ct", "--to", "gptq", "-o", tmp_path / "g", "-q")
    assert again.code == 0, again.err
    assert "compressed-tensors -> gptq" in again.out
    assert digests(tmp_path / "g") == digests(odd_checkpoint)
    exists = run_cli(capsys, "convert", tmp_path / "ct", "--to", "gptq", "-o", tmp_path / "g")
    assert exists.code == 1 and "already exists" in exists.err
    assert run_cli(capsys, "convert", tmp_path / "ct", "--to", "gptq", "-o", tmp_path / "g", "--force").code == 0
    same = run_cli(capsys, "convert", tmp_path / "ct", "--to", "gptq", "-o", tmp_path / "ct", "--force")
    assert same.code == 1 and "the source model" in same.err
    # an output that contains the source would delete it with --force: refused, source intact
    around = run_cli(capsys, "convert", tmp_path / "ct", "--to", "gptq", "-o", tmp_path, "--force")
    assert around.code == 1 and "contains the source model" in around.err, around.err
    assert digests(tmp_path / "ct")
    missing = run_cli(capsys, "convert", tmp_path / "nope", "--to", "gptq", "-o", tmp_path / "x")
    assert missing.code == 1 and "not a checkpoint folder" in missing.err
