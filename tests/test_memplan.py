"""The memory plan (``qtool.memplan``, ``qtool plan``): estimated before any weight is read,
refused with options that really fit. Its accuracy against measured peaks is checked by
``benchmarks/memory_scaling.py --plan`` (a measured RSS is not reliable inside pytest)."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli


def test_plan_reads_no_weights_and_splits_the_peak(capsys, mini_llama, monkeypatch):
    import safetensors
    import transformers.modeling_utils  # noqa: F401  (these bind safe_open when imported: imported
    import qtool.io  # noqa: F401  before the patch, so that it does not stay bound in them)
    import qtool.model_free  # noqa: F401

    def no_reads(*a, **k):
        raise AssertionError("qtool plan read a tensor")

    monkeypatch.setattr(safetensors, "safe_open", no_reads)
    res = run_cli(capsys, "plan", mini_llama, "--method", "gptq", "--nsamples", "16", "--seqlen", "64", "--json")
    assert res.code == 0, res.err
    plan = json.loads(res.out)
    assert plan["streamed"] is True and plan["fits"] is True
    parts = plan["parts_bytes"]
    assert plan["peak_cpu_bytes"] == sum(parts.values())
    # independent arithmetic for the terms that are exact: 16 x 64 tokens, hidden 128, float32: the
    # block's inputs and outputs, GPTQ's replayed attention and MLP outputs, the next inputs
    assert parts["activations"] == 5 * 16 * 64 * 128 * 4
    assert parts["resident weights"] == 49152 * 128 * 4  # streamed: the embeddings only


def test_whole_and_model_free_plans(capsys, mini_llama):
    whole = json.loads(run_cli(capsys, "plan", mini_llama, "--method", "rtn", "--no-model-free", "--no-stream", "--json").out)
    streamed = json.loads(run_cli(capsys, "plan", mini_llama, "--method", "rtn", "--no-model-free", "--json").out)
    free = json.loads(run_cli(capsys, "plan", mini_llama, "--method", "rtn", "--json").out)
    assert not whole["streamed"] and streamed["streamed"] and free["model_free"]
    assert free["peak_cpu_bytes"] < streamed["peak_cpu_bytes"] < whole["peak_cpu_bytes"]


def test_a_run_that_does_not_fit_is_refused_with_options_that_fit(capsys, tmp_path, mini_llama, calib_txt, monkeypatch):
    from qtool import memplan

    # activations held in CPU memory (auto would spill them to disk: tests/test_activations.py)
    args = ["--method", "gptq", "--calib", calib_txt, "--nsamples", "64", "--seqlen", "256", "--batch-size", "8",
            "--activations", "cpu"]
    need = json.loads(run_cli(capsys, "plan", mini_llama, *args, "--json").out)["peak_cpu_bytes"]
    monkeypatch.setattr(memplan, "available_cpu", lambda: need - 1)
    res = run_cli(capsys, "quantize", mini_llama, *args, "-o", tmp_path / "out")
    assert res.code == 1 and "Traceback" not in res.err
    line = res.err.strip().splitlines()[-1]
    assert line.startswith("qtool: error: not enough memory") and "try --" in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.qtool-work").exists()
    fixes = line.split("try ", 1)[1].split(" or ")
    for fix in fixes:  # every option named makes the plan fit
        option, value = fix.split()
        plan = run_cli(capsys, "plan", mini_llama, *args, option, value, "--json")
        assert plan.code == 0 and json.loads(plan.out)["fits"], (fix, plan.err)
    res = run_cli(capsys, "plan", mini_llama, *args)
    assert res.code == 1 and "not enough memory" in res.err


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_plan_terms_grow_with_what_they_count(mini_llama, method):
    """More samples, more activation memory; GPTQ's and AWQ's method terms exist."""
    from qtool.config import QuantizeConfig
    from qtool.loading import resolve, skeleton_model
    from qtool.memplan import estimate
    from qtool.models import spec_for

    model = skeleton_model(resolve(str(mini_llama)))
    spec = spec_for(model)
    small = estimate(model, spec, QuantizeConfig(method=method, nsamples=8, seqlen=64), streamed=True)
    big = estimate(model, spec, QuantizeConfig(method=method, nsamples=64, seqlen=64), streamed=True)
    assert big.parts["activations"] == 8 * small.parts["activations"] and small.parts["method"] > 0


def test_model_free_run_records_its_plan_and_peak(capsys, tmp_path, mini_llama):
    """A model-free run prints and records the plan ``qtool plan`` gives, with the peak."""
    plan = json.loads(run_cli(capsys, "plan", mini_llama, "--method", "rtn", "--json").out)
    res = run_cli(capsys, "quantize", mini_llama, "--method", "rtn", "-o", tmp_path / "out")
    assert res.code == 0 and "memory plan: peak" in res.err + res.out, res.err
    memory = json.loads((tmp_path / "out" / "qtool.json").read_text())["memory"]
    assert memory["plan"]["model_free"] and memory["plan"]["peak_cpu_bytes"] == plan["peak_cpu_bytes"]
    assert memory["peak_rss_bytes"] > 0


def test_bits_budget_plan_loads_whole_and_counts_the_sensitivity_pass(capsys, mini_llama):
    """--bits-budget runs the whole float model (never streamed, never model-free) and keeps
    the float log-probabilities of the sensitivity samples (vocab x tokens in float32) and
    every block's input of them."""
    from qtool.budget import SENSITIVITY_SAMPLES

    base = ["plan", mini_llama, "--method", "rtn", "--format", "compressed-tensors", "--seqlen", "64", "--json"]
    plain = json.loads(run_cli(capsys, *base).out)
    mixed = json.loads(run_cli(capsys, *base, "--bits-budget", "4.5").out)
    assert plain["model_free"] and not mixed["model_free"] and not mixed["streamed"]
    blocks, hidden = 2, 128  # the mini Llama's
    want = ((SENSITIVITY_SAMPLES + 3) * 49152 + SENSITIVITY_SAMPLES * blocks * hidden) * 64 * 4
    assert mixed["parts_bytes"]["sensitivity"] == want
