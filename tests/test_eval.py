"""`qtool eval`: side-by-side results equal single runs, the baseline against itself has
KL 0 and 100% agreement, and the default model's WikiText-2 perplexity matches an
independent implementation of the standard protocol."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import WIKITEXT_TEST
from helpers import run_cli

EVAL = ["--dataset", WIKITEXT_TEST, "--seqlen", "128", "--max-windows", "3"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, mini_llama):
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("evalck")
    for method in ("rtn", "gptq"):
        subprocess.run([sys.executable, "-m", "qtool", "-q", "quantize", str(mini_llama), "--method", method,
                        "--nsamples", "4", "--seqlen", "64", "-o", str(root / method)], check=True)
    return root


def test_side_by_side_equals_single_runs(capsys, ckpts, mini_llama):
    together = run_cli(capsys, "--json", "eval", ckpts / "rtn", ckpts / "gptq", mini_llama, "--baseline", mini_llama, *EVAL)
    assert together.code == 0, together.err
    rows = {r["model"]: r for r in together.json()["results"]}
    for path in (ckpts / "rtn", ckpts / "gptq", mini_llama):
        single = run_cli(capsys, "--json", "eval", path, *EVAL).json()["results"][0]
        assert single["ppl"] == rows[str(path)]["ppl"]
    own = rows[str(mini_llama)]
    assert own["kl_mean"] == 0.0 and own["top1_agreement"] == 1.0 and own["delta_ppl"] == 0.0
    for name in (ckpts / "rtn", ckpts / "gptq"):
        assert rows[str(name)]["kl_mean"] > 0 and rows[str(name)]["top1_agreement"] < 1
        assert rows[str(name)]["size_bytes"] < own["size_bytes"]


def test_stride_counts_every_token_once(capsys, mini_llama):
    from qtool.eval import windows

    wins = windows(1000, 128, 64, None)
    predicted = sum(128 - off for _, off in wins)
    assert predicted == (wins[-1][0] + 128) - 1  # each position after the first predicted once
    res = run_cli(capsys, "--json", "eval", mini_llama, "--dataset", WIKITEXT_TEST, "--seqlen", "128", "--stride", "64",
                  "--max-windows", "3").json()
    assert res["protocol"]["stride"] == 64 and res["protocol"]["tokens"] == 127 + 64 + 64


def independent_wikitext_ppl(model_dir, windows: int, seqlen: int = 2048) -> float:
    """The standard GPTQ/AWQ protocol written from its description: rows of the test split
    joined with two newlines, tokenized once, non-overlapping windows, mean NLL."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(line)["text"] for line in open(WIKITEXT_TEST, encoding="utf-8")]
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("\n\n".join(rows), return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    losses = []
    with torch.no_grad():
        for i in range(windows):
            x = ids[:, i * seqlen:(i + 1) * seqlen]
            out = model(x, labels=x)  # HF shifts labels: mean NLL over seqlen - 1 tokens
            losses.append(out.loss.double() * (seqlen - 1))
    return math.exp(sum(losses) / (windows * (seqlen - 1)))


def test_default_model_ppl_matches_independent_protocol(capsys, default_model_dir):
    res = run_cli(capsys, "--json", "eval", "--dataset", WIKITEXT_TEST, "--max-windows", "2")
    assert res.code == 0, res.err
    ours = res.json()["results"][0]["ppl"]
    theirs = independent_wikitext_ppl(default_model_dir, windows=2)
    assert abs(ours - theirs) / theirs < 1e-4, (ours, theirs)
    assert res.json()["protocol"]["tokens"] == 2 * 2047


def test_checkpoints_are_evaluated_through_packed_weights(ckpts):
    """No float copy of a quantized layer exists: each is a PackedLinear whose forward
    runs the dequant-matmul kernel, and its logits equal the dequantized reading's."""
    from qtool.api import load_any
    from qtool.kernels import PackedLinear

    packed, _, _ = load_any(str(ckpts / "gptq"), kernel="auto")
    layers = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 14
    assert not any(isinstance(m, torch.nn.Linear) and m.weight.shape[1] in (128, 256)
                   for n, m in packed.named_modules() if "layers" in n)
    dense, _, _ = load_any(str(ckpts / "gptq"))
    ids = torch.arange(64)[None] * 7 % 1000
    with torch.inference_mode():
        assert torch.allclose(packed(ids).logits, dense(ids).logits, atol=1e-4, rtol=1e-4)
