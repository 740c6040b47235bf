"""Mixture-of-experts families: mini random-init Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE
models (4 experts, top-2 routing, 2 layers) built from their transformers config classes.

* unfusing the fused 3-D experts into per-expert linears keeps the model's function;
* RTN and GPTQ run end to end to compressed-tensors checkpoints in the per-expert naming
  the serving engines read (Mixtral: ``block_sparse_moe.experts.{e}.w1``), the router in
  float; transformers loads them (its MoE conversion fuses the experts again) with logits
  matching qtool's own reading, and every expert weight is quantized (E x 3 x layers);
* AWQ is refused for MoE in one line before calibration;
* experts the router never chooses get the selected low-token policy, reported in
  qtool.json and ``qtool inspect``, never NaN; the routed token counts add up to
  tokens x top-k.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from helpers import run_cli

HAS_CT = importlib.util.find_spec("compressed_tensors") is not None
VOCAB = 49152  # the shared tokenizer's
EXPERTS, TOP_K, LAYERS = 4, 2, 2

# family -> (config class, overrides, checkpoint name of expert e's gate in block i)
ARCHS = {
    "mixtral": ("MixtralConfig", {"num_local_experts": EXPERTS, "intermediate_size": 64},
                "model.layers.{i}.block_sparse_moe.experts.{e}.w1"),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": EXPERTS, "moe_intermediate_size": 64,
                                     "shared_expert_intermediate_size": 64}, "model.layers.{i}.mlp.experts.{e}.gate_proj"),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": EXPERTS, "moe_intermediate_size": 64, "head_dim": 32},
                  "model.layers.{i}.mlp.experts.{e}.gate_proj"),
    "olmoe": ("OlmoeConfig", {"num_experts": EXPERTS, "intermediate_size": 64},
              "model.layers.{i}.mlp.experts.{e}.gate_proj"),
}
# quantized linears per block besides the routed experts: q/k/v/o (+ the shared expert)
DENSE = {"mixtral": 4, "qwen2_moe": 7, "qwen3_moe": 4, "olmoe": 4}


def mini_model(family: str, seed: int = 0, dead_experts: bool = False):
    """A float32 mini MoE model. ``dead_experts``: block 0's router never picks experts 2
    and 3 (hidden dim 0 is 5 for every token at block 0's MoE input, and their router
    rows are -1000 there while experts 0 and 1 score 0)."""
    import transformers

    cls_name, extra, _ = ARCHS[family]
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, num_experts_per_tok=TOP_K,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**kwargs),
                                                          dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.randn_like(param) * 0.3 + 1.0)
            elif name.endswith("gate.weight") and "shared" not in name:
                param.normal_(0, 0.5)  # the init (zeros or 0.02) routes nearly at random
        if dead_experts:
            model.model.embed_tokens.weight[:, 0] = 5.0
            layer = model.model.layers[0]
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.post_attention_layernorm.weight[0] = 1.0
            router = layer.mlp.gate.weight
            router.zero_()
            router[2:, 0] = -1000.0
            if family == "qwen2_moe":
                layer.mlp.shared_expert.down_proj.weight[0] = 0.0
    return model


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory, default_model_dir) -> dict:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("moe")
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    out = {}
    for family in ARCHS:
        for dead in (False, True):
            folder = root / f"{family}{'-dead' if dead else ''}"
            mini_model(family, dead_experts=dead).save_pretrained(folder, safe_serialization=True)
            tokenizer.save_pretrained(folder)
            out[family, dead] = folder
    return out


def _ids(n: int, seqlen: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.float()


@pytest.mark.parametrize("family", sorted(ARCHS))
def test_unfused_experts_keep_the_function_and_pass_the_layout_check(family):
    from qtool.models import spec_for
    from qtool.models.layout import check_execution, probe_blocks

    model = mini_model(family)
    ids = _ids(2, 16)
    before = _logits(model, ids)
    spec = spec_for(model)
    assert not [n for n, p in model.named_parameters() if p.dim() > 2]  # no fused weight left
    experts = [n for n in spec.linears if ".experts." in n]
    assert len(experts) == EXPERTS * 3
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-5, atol=1e-5)
    for probe in probe_blocks(model, spec):
        check_execution(spec, probe)


def test_fused_weights_left_in_a_block_are_refused():
    """A spec without ``moe`` on an MoE model: the stacked expert weights would be skipped,
    so the layout check refuses in one line."""
    from dataclasses import replace

    from qtool.errors import UnsupportedError
    from qtool.models import qwen3_moe
    from qtool.models.layout import check_execution, probe_blocks

    model = mini_model("qwen3_moe")
    spec = replace(qwen3_moe.SPEC, moe=None)
    with pytest.raises(UnsupportedError, match="fused expert weights"):
        check_execution(spec, next(probe_blocks(model, spec)))


def test_mixtral_disk_names_round_trip():
    from qtool.models import mixtral
    from qtool.models.moe import rename

    spec = mixtral.SPEC
    pairs = {"model.layers.3.mlp.experts.7.gate_proj.weight_packed": "model.layers.3.block_sparse_moe.experts.7.w1.weight_packed",
             "model.layers.0.mlp.experts.0.down_proj": "model.layers.0.block_sparse_moe.experts.0.w2",
             "model.layers.1.mlp.gate.weight": "model.layers.1.block_sparse_moe.gate.weight",
             "model.layers.1.self_attn.q_proj.weight": "model.layers.1.self_attn.q_proj.weight"}
    for ours, disk in pairs.items():
        assert rename(ours, spec, True) == disk
        assert rename(disk, spec, False) == ours


METHOD_ARGS = {"rtn": ["--method", "rtn", "--sym"], "gptq": ["--method", "gptq", "--sym", "--no-act-order"],
               "signround": ["--method", "signround", "--sym", "--rounding-steps", "3"]}


def _quantize(capsys, src, out, calib, *extra):
    return run_cli(capsys, "-q", "--json", "quantize", src, "-o", out, *extra, "-g", "32",
                   "--format", "compressed-tensors", "--calib", calib, "--nsamples", "4", "--seqlen", "32")


@pytest.mark.skipif(not HAS_CT, reason="compressed-tensors is not installed (pip install -e '.[dev]')")
@pytest.mark.parametrize("method", sorted(METHOD_ARGS))
@pytest.mark.parametrize("family", sorted(ARCHS))
def test_transformers_loads_what_qtool_reads(capsys, tmp_path, moe_dirs, calib_txt, family, method):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from qtool.api import load_any
    from qtool.io import read_quantized_layers

    out = tmp_path / "ckpt"
    res = _quantize(capsys, moe_dirs[family, False], out, calib_txt, *METHOD_ARGS[method])
    assert res.code == 0, res.err
    record = res.json()
    assert record["model"]["architecture"] == family
    qweights, plain, _, _ = read_quantized_layers(out)
    # coverage: every expert weight of every layer, in the serving engines' naming
    gates = {ARCHS[family][2].format(i=i, e=e) for i in range(LAYERS) for e in range(EXPERTS)}
    assert gates <= set(qweights)
    assert len([n for n in qweights if ".experts." in n]) == EXPERTS * 3 * LAYERS
    assert len(qweights) == (EXPERTS * 3 + DENSE[family]) * LAYERS
    assert set(record["layers"]) == set(qweights)
    router = "block_sparse_moe.gate.weight" if family == "mixtral" else "mlp.gate.weight"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor(f"model.layers.0.{router}").dtype == torch.float32  # the router stays float
    if method == "gptq":
        tokens = 4 * 32
        for i in range(LAYERS):
            counts = [record["layers"][ARCHS[family][2].format(i=i, e=e)]["expert_tokens"] for e in range(EXPERTS)]
            assert sum(counts) == tokens * TOP_K, counts
    theirs = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    ours, _, _ = load_any(str(out))
    ids = _ids(2, 24, seed=3)
    expected = _logits(ours, ids)
    assert torch.isfinite(expected).all()
    got = _logits(theirs, ids)
    diff = (got - expected).abs().max().item()
    assert diff <= 2e-3 * max(1.0, expected.abs().max().item()), diff
    # transformers' fused experts hold exactly qtool's per-expert weights (float16-rounded)
    gate_up = theirs.model.layers[1].mlp.experts.gate_up_proj
    gate = qweights[ARCHS[family][2].format(i=1, e=3)].dequantize(torch.float16).float()
    assert torch.equal(gate_up[3, : gate.shape[0]], gate)


@pytest.mark.parametrize("method", ["awq", "awq-gptq"])
def test_awq_is_refused_before_calibration(capsys, tmp_path, moe_dirs, calib_txt, method):
    res = _quantize(capsys, moe_dirs["qwen3_moe", False], tmp_path / "ckpt", calib_txt, "--method", method)
    assert res.code != 0 and f"--method {method} is not supported" in (res.out + res.err)
    message = json.loads(res.out)["error"]["message"] if res.out.strip() else res.err
    assert "mixture-of-experts" in message and "--method gptq" in message
    assert "\n" not in message.strip()
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("policy", ["all-experts", "rtn"])
def test_experts_without_tokens_get_the_policy(capsys, tmp_path, moe_dirs, calib_txt, policy):
    """Block 0's router never picks experts 2 and 3: they get 0 tokens and the selected
    policy (reported in qtool.json), their weights are finite; with ``all-experts`` their
    GPTQ result uses the statistics of all tokens (it differs from plain RTN)."""
    from qtool.io import read_quantized_layers
    from qtool.rtn import rtn_quantize

    family = "qwen3_moe"
    out = tmp_path / "ckpt"
    res = _quantize(capsys, moe_dirs[family, True], out, calib_txt, *METHOD_ARGS["gptq"], "--moe-low-tokens", policy)
    assert res.code == 0, res.err
    layers = json.loads((out / "qtool.json").read_text())["layers"]
    qweights, _, _, _ = read_quantized_layers(out)
    source = mini_model(family, dead_experts=True)
    for e in range(EXPERTS):
        for linear in ("gate_proj", "up_proj", "down_proj"):
            name = f"model.layers.0.mlp.experts.{e}.{linear}"
            stats = layers[name]
            assert torch.isfinite(qweights[name].dequantize()).all()
            if e < 2:
                assert stats["expert_tokens"] == 4 * 32 and stats["expert_policy"] == "calibrated"
                continue
            assert stats["expert_tokens"] == 0 and stats["expert_policy"] == policy, (name, stats)
            if linear == "gate_proj":
                fused = source.model.layers[0].mlp.experts.gate_up_proj[e]
                rtn = rtn_quantize(fused[: fused.shape[0] // 2], 4, 32, True)
                same = torch.equal(rtn.codes, qweights[name].codes)
                assert same == (policy == "rtn"), name
    shown = run_cli(capsys, "inspect", out)
    assert shown.code == 0, shown.err
    line = next(line for line in shown.out.splitlines() if line.startswith("experts:"))
    assert line.startswith(f"experts: {EXPERTS * LAYERS} routed experts") and f"{policy} " in line, line
    assert "fewest calibration tokens: 0" in line and "model.layers.0.mlp.experts.2" in line, line
