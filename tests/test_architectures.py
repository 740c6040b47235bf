"""Architecture families beyond Llama: mini random-init Gemma, Gemma2, Gemma3 (text) and
OLMo2 models (Llama as the control) built from their transformers config classes.

* the family files are consistent, and every AWQ fold of every block is proven on the
  real model (``qtool.awq.prove``); a ``(1 + w)`` norm folded as ``x * w``, or Gemma2's
  post-attention norm taken for the MLP's input norm, is refused, naming block and group;
* an unregistered model with Llama's module names is refused for AWQ when a fold does not
  hold (Gemma-like norms) or a producer is missing (OLMo2-like), in one line and before
  any calibration is loaded; GPTQ/RTN pass its layout check;
* every block is calibrated with the arguments the real forward gives it (Gemma2/3 local
  vs global layers);
* RTN, GPTQ and AWQ run end to end to compressed-tensors checkpoints that transformers
  loads, with weights equal to qtool's own reading rounded to float16 (compressed-tensors
  decompresses in the scale dtype) and logits matching it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch
from helpers import run_cli
from torch import nn

HAS_CT = importlib.util.find_spec("compressed_tensors") is not None

# family -> (transformers config class, overrides); as many kv heads as heads, so the
# v -> o fold applies too; sliding windows shorter than the test sequences, so local and
# global layers really differ
ARCHS = {
    "llama": ("LlamaConfig", {}),
    "gemma": ("GemmaConfig", {}),
    "gemma2": ("Gemma2Config", {"sliding_window": 8, "query_pre_attn_scalar": 32}),
    "gemma3": ("Gemma3TextConfig", {"sliding_window": 8, "query_pre_attn_scalar": 32,
                                    "layer_types": ["sliding_attention", "full_attention"]}),
    "olmo2": ("Olmo2Config", {}),
    "phi3": ("Phi3Config", {}),
    "granite": ("GraniteConfig", {"embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                                  "attention_multiplier": 0.1, "logits_scaling": 4.0}),
    "olmo": ("OlmoConfig", {}),
    "smollm3": ("SmolLM3Config", {"no_rope_layer_interval": 2}),
    "starcoder2": ("Starcoder2Config", {}),
    "glm": ("GlmConfig", {}),
    "glm4": ("Glm4Config", {}),
    "cohere": ("CohereConfig", {}),
}
GEMMAS = ("gemma", "gemma2", "gemma3")
# family -> the family file that covers it, where its name differs
SPEC_NAME = {"glm4": "glm"}
# AWQ groups per block where a family has fewer than the Llama-like four
AWQ_GROUPS = {"olmo2": 2, "olmo": 2, "cohere": 2, "starcoder2": 3}
VOCAB = 49152  # the shared tokenizer's (calibration text goes through it)


def mini_model(family: str, seed: int = 0):
    """A float32 mini model with random norm weights (the inits, ones or zeros, would make
    every norm fold trivially exact)."""
    import transformers

    cls_name, extra = ARCHS[family]
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**kwargs),
                                                          dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # Gemma norms multiply by 1 + w (init 0), the others by w (init 1)
                param.copy_(torch.randn_like(param) * 0.3 + (0.0 if family in GEMMAS else 1.0))
    return model


@pytest.fixture(scope="module")
def mini_dirs(tmp_path_factory, default_model_dir) -> dict:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("arch")
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    out = {}
    for family in ARCHS:
        folder = root / family
        mini_model(family).save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        out[family] = folder
    return out


def _ids(n: int, seqlen: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.float()


def _block_linears(model) -> dict[str, int]:
    """Full name -> weight elements of every ``nn.Linear`` in the decoder blocks (no
    dense family here declares a float linear): what a run must quantize."""
    return {f"model.layers.{i}.{n}": m.weight.numel() for i, block in enumerate(model.model.layers)
            for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def _prove(model, spec):
    from qtool.awq.prove import prove_folds
    from qtool.models.layout import check_execution, probe_blocks

    proofs = []
    for probe in probe_blocks(model, spec):
        check_execution(spec, probe)
        proofs += prove_folds(spec, probe)
    return proofs


# --- family files -----------------------------------------------------------------------

def _families():
    from qtool.models import FAMILIES

    return FAMILIES


@pytest.mark.parametrize("spec", _families(), ids=lambda s: s.name)
def test_family_file_is_consistent(spec):
    """Static facts every file must satisfy: each linear listed once, each group's
    consumers are quantized linears inside the scored module, model types unique."""
    from qtool.models import FAMILIES, Producer

    assert len(set(spec.linears)) == len(spec.linears)
    for group in spec.scale_groups:
        assert set(group.linears) <= set(spec.linears), group
        assert all(n == group.module or n.startswith(group.module + ".") for n in group.linears), group
        assert (group.kind is Producer.LINEAR) == (group.prev in spec.linears), group
    others = {t for s in FAMILIES if s is not spec for t in s.model_types}
    assert not others & set(spec.model_types)


@pytest.mark.parametrize("family", sorted(ARCHS))
def test_every_fold_of_every_block_is_proven(family):
    from qtool.models import spec_for

    model = mini_model(family)
    spec = spec_for(model)
    assert spec.name == SPEC_NAME.get(family, family)
    proofs = _prove(model, spec)
    groups = AWQ_GROUPS.get(family, 4)  # OLMo/OLMo2/Cohere: v -> o and up -> down only
    assert len(proofs) == groups * model.config.num_hidden_layers
    assert {p.group for p in proofs} == {g.prev for g in spec.scale_groups}
    assert max(p.rel_error for p in proofs) < 1e-5


def test_one_plus_w_fold_is_exact_and_plain_fold_is_not():
    """``norm(x) * (1 + w)``: the fold ``w' = (1 + w) / s - 1`` keeps the output; the
    ``x * w`` fold (what qtool did for every norm before) does not."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    from qtool.awq.apply import fold_scales
    from qtool.models import Producer

    torch.manual_seed(0)
    norm, lin = GemmaRMSNorm(64), nn.Linear(64, 32)
    with torch.no_grad():
        norm.weight.normal_(0, 0.5)
    x, s = torch.randn(16, 64), torch.rand(64) * 3 + 0.25
    with torch.no_grad():
        reference = lin(norm(x))
    for kind, exact in ((Producer.RMSNORM_ONE_PLUS, True), (Producer.RMSNORM, False)):
        n2, l2 = GemmaRMSNorm(64), nn.Linear(64, 32)
        n2.load_state_dict(norm.state_dict())
        l2.load_state_dict(lin.state_dict())
        fold_scales(n2, [l2], s, "g", kind=kind)
        with torch.no_grad():
            err = float((l2(n2(x)) - reference).abs().max() / reference.abs().max())
        assert (err < 1e-5) == exact, (kind, err)


@pytest.mark.parametrize("family", GEMMAS)
def test_plain_fold_on_gemma_norms_is_refused(family):
    """The Llama fold (``x * w``) on a Gemma-family norm fails the proof at block 0's
    first group, before any calibration."""
    from qtool.errors import UnsupportedError
    from qtool.models import Producer, spec_for
    from qtool.models.base import pre_norm_scale_groups

    model = mini_model(family)
    spec = spec_for(model)
    wrong = replace(spec, scale_groups=pre_norm_scale_groups(Producer.RMSNORM, mlp_norm=spec.scale_groups[2].prev))
    with pytest.raises(UnsupportedError, match=r"model\.layers\.0\.input_layernorm -> q_proj/k_proj/v_proj.*"
                                                r"use --method gptq or rtn"):
        _prove(model, wrong)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_post_attention_norm_as_mlp_input_is_refused(family):
    """In Gemma2/3 ``post_attention_layernorm`` normalises the attention output; the MLP
    reads ``pre_feedforward_layernorm``. The Llama grouping fails the proof."""
    from qtool.errors import UnsupportedError
    from qtool.models import Producer, spec_for
    from qtool.models.base import pre_norm_scale_groups

    model = mini_model(family)
    wrong = replace(spec_for(model), scale_groups=pre_norm_scale_groups(Producer.RMSNORM_ONE_PLUS))
    with pytest.raises(UnsupportedError, match=r"model\.layers\.0\.post_attention_layernorm -> gate_proj/up_proj"):
        _prove(model, wrong)


# --- unregistered architectures ---------------------------------------------------------

def _unregistered(family: str, name: str):
    model = mini_model(family)
    model.config.model_type = name
    return model


@pytest.mark.parametrize("family,why", [("gemma", "input_layernorm -> q_proj/k_proj/v_proj: folding changes"),
                                        ("olmo2", "the block has no input_layernorm")])
def test_unregistered_llama_named_model_awq_refused_gptq_planned(family, why):
    from qtool.api import plan
    from qtool.config import QuantizeConfig
    from qtool.errors import UnsupportedError

    model = _unregistered(family, f"my_{family}")
    with pytest.raises(UnsupportedError, match=f"{why}.*'my_{family}' is not registered.*use --method gptq or rtn"):
        plan(model, QuantizeConfig(method="awq", group_size=32))
    for method in ("gptq", "rtn"):
        spec, _, shapes = plan(model, QuantizeConfig(method=method, group_size=32))
        assert spec.name == f"generic-llama-like (my_{family})" and len(shapes) == 14


def test_unregistered_model_with_an_unlisted_linear_is_refused():
    """A linear the generic layout does not list would be left in float silently."""
    from qtool.api import plan
    from qtool.config import QuantizeConfig
    from qtool.errors import UnsupportedError

    model = _unregistered("llama", "my_llama")
    for layer in model.model.layers:
        layer.mlp.extra_proj = nn.Linear(64, 64)
    with pytest.raises(UnsupportedError, match=r"model\.layers\.0 has linears the layout does not list: "
                                                r"mlp\.extra_proj.*add a file under qtool/models/"):
        plan(model, QuantizeConfig(method="rtn", group_size=32))


def test_awq_refusal_comes_before_calibration(tmp_path, monkeypatch, mini_dirs):
    """Through ``api.quantize``: the refusal is raised before calibration data is loaded
    and nothing is written."""
    import qtool.api
    import qtool.calib
    from qtool.config import QuantizeConfig
    from qtool.errors import UnsupportedError

    model = _unregistered("gemma", "my_gemma")
    tokenizer_dir = mini_dirs["gemma"]

    def fake_load(source, dtype):
        from transformers import AutoTokenizer

        return model, AutoTokenizer.from_pretrained(tokenizer_dir), str(tokenizer_dir)

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration was loaded before the refusal")

    monkeypatch.setattr(qtool.api, "load_model", fake_load)
    monkeypatch.setattr(qtool.calib, "load_calibration", no_calibration)
    out = tmp_path / "out"
    with pytest.raises(UnsupportedError, match="AWQ cannot fold.*use --method gptq or rtn"):
        qtool.api.quantize(str(tokenizer_dir), out, QuantizeConfig(method="awq", group_size=32), stream=False)
    assert not out.exists()


# --- per-block call arguments -----------------------------------------------------------

class _Recorder:
    """A pipeline method that quantizes nothing and records each block's inputs."""

    name = "record"
    needs_calibration = True

    def __init__(self):
        self.seen = []

    def quantize_block(self, ctx):
        self.seen.append((list(ctx.inputs.hidden), list(ctx.inputs.kwargs)))
        return {}


def _assert_same(a, b, where):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (where, sorted(a), sorted(b))
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, where


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
def test_every_block_gets_the_inputs_of_the_real_forward(family):
    """The pipeline's inputs of every block (hidden states and keyword arguments: masks,
    rotary tables) equal those a hooked forward of the model passes to that block."""
    from qtool.config import QuantizeConfig
    from qtool.models import get_blocks, spec_for
    from qtool.pipeline import quantize_model

    model = mini_model(family)
    spec = spec_for(model)
    ids = _ids(4, 16)
    real = {}

    def hook(i):
        def pre(module, args, kwargs):
            real.setdefault(i, []).append((args[0].clone(), dict(kwargs)))

        return pre

    blocks = get_blocks(model, spec)
    handles = [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for start in range(0, 4, 2):
            _logits(model, ids[start:start + 2])
    finally:
        for h in handles:
            h.remove()
    recorder = _Recorder()
    quantize_model(model, spec, recorder, QuantizeConfig(method="rtn", group_size=32, batch_size=2), ids,
                   torch.device("cpu"))
    assert len(recorder.seen) == len(blocks)
    for i, (hidden, kwargs) in enumerate(recorder.seen):
        assert len(hidden) == len(real[i]) == 2
        for c, (h, kw) in enumerate(zip(hidden, kwargs)):
            torch.testing.assert_close(h, real[i][c][0], rtol=1e-6, atol=1e-6)
            _assert_same(kw, real[i][c][1], f"block {i} chunk {c}")
    if family == "gemma3":  # local and global layers: different rotary tables and masks
        with pytest.raises(AssertionError):
            _assert_same(recorder.seen[0][1][0], recorder.seen[1][1][0], "blocks 0 and 1")


# --- end to end -------------------------------------------------------------------------

METHOD_ARGS = {
    "rtn": ["--method", "rtn", "--sym"],
    "gptq": ["--method", "gptq", "--sym", "--no-act-order"],
    "awq": ["--method", "awq", "--asym"],
    "signround": ["--method", "signround", "--sym", "--rounding-steps", "3"],
}


@pytest.mark.skipif(not HAS_CT, reason="compressed-tensors is not installed (pip install -e '.[dev]')")
@pytest.mark.parametrize("method", sorted(METHOD_ARGS))
@pytest.mark.parametrize("family", [f for f in sorted(ARCHS) if f != "llama"])  # llama: tests/test_clients.py
def test_transformers_loads_what_qtool_reads(capsys, tmp_path, mini_dirs, calib_txt, family, method):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from qtool.api import load_any
    from qtool.io import read_quantized_layers

    out = tmp_path / "ckpt"
    res = run_cli(capsys, "-q", "--json", "quantize", mini_dirs[family], "-o", out, *METHOD_ARGS[method], "-g", "32",
                  "--format", "compressed-tensors", "--calib", calib_txt, "--nsamples", "4", "--seqlen", "32")
    assert res.code == 0, res.err
    assert res.json()["model"]["architecture"] == SPEC_NAME.get(family, family)
    theirs = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    assert type(theirs).__name__ == {"gemma3": "Gemma3ForCausalLM"}.get(family, type(theirs).__name__)
    qweights, _, _, _ = read_quantized_layers(out)
    expected = _block_linears(AutoModelForCausalLM.from_pretrained(mini_dirs[family], dtype=torch.float32))
    assert sorted(qweights) == sorted(expected)
    coverage = res.json()["coverage"]  # the coverage line counts exactly the block linears
    assert (coverage["quantized"], coverage["quantized_params"]) == (len(expected), sum(expected.values()))
    for name, qw in qweights.items():
        assert torch.equal(theirs.get_submodule(name).weight, qw.dequantize(torch.float16).float()), name
    ours, _, _ = load_any(str(out))
    ids = _ids(2, 24, seed=3)
    expected = _logits(ours, ids)
    got = _logits(theirs, ids)
    diff = (got - expected).abs().max().item()
    assert diff <= 2e-3 * max(1.0, expected.abs().max().item()), diff
    # with qtool's weights rounded to float16 as well, everything else must agree exactly
    with torch.no_grad():
        for name, qw in qweights.items():
            ours.get_submodule(name).weight.copy_(qw.dequantize(torch.float16).float())
    torch.testing.assert_close(got, _logits(ours, ids), rtol=1e-5, atol=1e-5)


# --- coverage ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(ARCHS))
def test_coverage_counts_the_block_linears(family):
    """Before calibration: the planned weights are every linear of the decoder blocks; all
    other parameters are kept in float with a reason, and the counts add up to the model."""
    from qtool.coverage import plan_coverage
    from qtool.models import spec_for

    model = mini_model(family)
    cov = plan_coverage(model, spec_for(model))
    expected = _block_linears(model)
    assert cov.quantized == list(expected) and cov.quantized_params == sum(expected.values())
    params = dict(model.named_parameters())  # tied tensors once
    assert cov.total_params == sum(p.numel() for p in params.values())
    assert cov.weights == sum(p.dim() >= 2 for p in params.values()) == len(expected) + 1  # + the embedding (tied head)
    assert cov.quantized_params + sum(g.params for g in cov.kept.values()) == cov.total_params
    assert cov.kept["embeddings"].tensors == ["model.embed_tokens.weight"] and cov.tied_lm_head
    pct = 100 * sum(expected.values()) / cov.total_params
    assert cov.line().startswith(f"quantized {len(expected)} of {len(expected) + 1} weights ({pct:.1f}% of parameters); "
                                 "kept in float: embeddings (1 tensor, ")
    assert "lm_head (tied to the embeddings" in cov.line()


def test_exclusions_and_uncovered_weights():
    """A weight outside the family file's linears is refused (naming it and --exclude);
    --exclude keeps it, or a block linear, in float; a pattern that matches nothing is refused."""
    from qtool.coverage import plan_coverage
    from qtool.errors import UserInputError
    from qtool.models import spec_for

    model = mini_model("llama")
    spec = spec_for(model)
    model.model.adapter = nn.Linear(64, 64)
    with pytest.raises(UserInputError, match=r"model\.adapter\.weight: .*--exclude 'model\.adapter'"):
        plan_coverage(model, spec)
    cov = plan_coverage(model, spec, ("model.adapter", "*.1.mlp.down_proj"))
    assert cov.kept["excluded"].tensors == ["model.layers.1.mlp.down_proj.weight", "model.adapter.weight"]
    assert "model.layers.1.mlp.down_proj" not in cov.quantized and len(cov.quantized) == 13
    assert "excluded (2 tensors" in cov.line()
    with pytest.raises(UserInputError, match=r"--exclude \*\.gate matches no quantizable weight"):
        plan_coverage(model, spec, ("model.adapter", "*.gate"))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_excluded_linear_stays_float(capsys, tmp_path, mini_dirs, calib_txt, method):
    """``--exclude``: the linear is saved in float with the function the float model has
    (GPTQ: its original weight; AWQ: scaled by the fold, the norm compensating), it is not
    among the quantized layers, and qtool.json records the pattern and the counts."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qtool.api import load_any

    out = tmp_path / "ckpt"
    res = run_cli(capsys, "-q", "--json", "quantize", mini_dirs["phi3"], "-o", out, *METHOD_ARGS[method], "-g", "32",
                  "--format", "compressed-tensors", "--calib", calib_txt, "--nsamples", "4", "--seqlen", "32",
                  "--exclude", "*.0.mlp.down_proj", "--exclude", "*.1.self_attn.o_proj")
    assert res.code == 0, res.err
    record = res.json()
    excluded = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    assert not set(excluded) & set(record["layers"]) and len(record["layers"]) == 6
    cov = record["coverage"]
    assert cov["exclude"] == ["*.0.mlp.down_proj", "*.1.self_attn.o_proj"] and cov["quantized"] == 6
    assert cov["kept_in_float"]["excluded"]["names"] == [n + ".weight" for n in excluded]
    assert record["config"]["exclude"] == cov["exclude"]
    saved = {}
    for f in out.glob("*.safetensors"):
        saved.update(load_file(f))
    original = AutoModelForCausalLM.from_pretrained(mini_dirs["phi3"], dtype=torch.float32)
    for name in excluded:
        w = saved[name + ".weight"]
        assert w.dtype == original.get_submodule(name).weight.dtype
        if method == "gptq":
            assert torch.equal(w, original.get_submodule(name).weight), name
    ours, _, _ = load_any(str(out))  # AWQ: the float layer carries the fold; the model stays close to the float one
    ids = _ids(1, 16, seed=5)
    ref = _logits(original, ids)
    assert (_logits(ours, ids) - ref).abs().max() < 0.5 * ref.abs().max()


def test_readme_families_table_is_generated_from_the_registry():
    """The README's table equals ``python -m qtool.models --markdown`` (regenerate it
    with that command after adding a family)."""
    from pathlib import Path

    from qtool.models.table import BEGIN, END, markdown_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start, stop = readme.index(BEGIN), readme.index(END) + len(END)
    assert readme[start:stop] == markdown_table()
    for spec in _families():
        assert f"| {spec.name} |" in markdown_table()


def test_float_modules_are_kept_with_their_reason():
    """A family's model-level float modules (a VLM's vision tower) are kept in float with
    their reason instead of being refused."""
    from qtool.coverage import plan_coverage
    from qtool.models import spec_for

    model = mini_model("llama")
    model.model.tower = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64))
    cov = plan_coverage(model, replace(spec_for(model), float_modules=("model.tower",)))
    assert cov.kept["float_modules"].tensors == [f"model.tower.{n}" for n in ("0.weight", "0.bias", "1.weight", "1.bias")]
    assert len(cov.quantized) == 14
