"""AWQ's search size: ``--awq-search-tokens`` resolved against the model (auto keeps the
Gram matrices full rank), recorded in qtool.json, and a rank-deficient Gram matrix
regularised so that errors in directions the search tokens never saw still count."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli


def test_auto_search_tokens_cover_twice_the_largest_k():
    from qtool.config import QuantizeConfig, resolve_awq_search_tokens

    smollm2 = {"q": 576, "down": 1536}
    llama7b = {"q": 4096, "down": 11008}
    awq = QuantizeConfig(method="awq")
    assert resolve_awq_search_tokens(awq, smollm2).awq_search_tokens == 4096  # unchanged for small models
    assert resolve_awq_search_tokens(awq, llama7b).awq_search_tokens == 22016
    explicit = QuantizeConfig(method="awq", awq_search_tokens=1024)
    assert resolve_awq_search_tokens(explicit, llama7b).awq_search_tokens == 1024
    assert resolve_awq_search_tokens(QuantizeConfig(method="gptq"), llama7b).awq_search_tokens == 0


def test_search_tokens_only_for_awq():
    from qtool.config import QuantizeConfig
    from qtool.errors import UserInputError

    with pytest.raises(UserInputError, match="only applies to --method awq"):
        QuantizeConfig(method="gptq", awq_search_tokens=512)
    with pytest.raises(UserInputError, match="awq-search-tokens"):
        QuantizeConfig(method="awq", awq_search_tokens=-1)


def test_rank_deficient_gram_is_regularised():
    from qtool.awq.stats import RIDGE, regularised_gram

    torch.manual_seed(0)
    k = 64
    x = torch.randn(16, k)  # 16 tokens < 64 channels: rank 16
    gram = x.T @ x
    assert torch.linalg.matrix_rank(gram) == 16
    reg = regularised_gram(gram, 16)
    assert float(torch.linalg.eigvalsh(reg).min()) > 0.5 * RIDGE * float(gram.diagonal().mean())
    # an error in the null space of X is invisible to X^T X but not to the regularised one
    null = torch.linalg.svd(x, full_matrices=True).Vh[-1]
    assert float(null @ gram @ null) < 1e-3
    assert float(null @ reg @ null) > 0.5 * RIDGE * float(gram.diagonal().mean())
    enough = torch.randn(128, k)
    full = enough.T @ enough
    assert regularised_gram(full, 128) is full  # enough tokens: untouched


def test_accumulated_stats_use_the_regularised_gram():
    from qtool.awq.stats import _InputAccumulator

    acc = _InputAccumulator(search_chunks=1)
    acc.add(torch.randn(1, 8, 32))  # 8 tokens, k = 32
    acc.add(torch.randn(1, 8, 32))  # outside the search subsample
    st = acc.result()
    assert st.search_tokens == 8 and st.num_tokens == 16
    assert torch.linalg.matrix_rank(st.gram) == 32


def test_search_tokens_recorded_and_respected(capsys, tmp_path, mini_llama, calib_txt):
    # 4 samples of 32 tokens; mini llama has k up to 256 -> auto = 4096 (all 128 tokens used)
    base = ["quantize", str(mini_llama), "--method", "awq", "-g", "64", "--calib", str(calib_txt),
            "--nsamples", "4", "--seqlen", "32", "--batch-size", "1"]
    auto = run_cli(capsys, *base, "-o", str(tmp_path / "auto"))
    assert auto.code == 0, auto.err
    rec = json.loads((tmp_path / "auto" / "qtool.json").read_text())
    assert rec["config"]["awq_search_tokens"] == 4096
    few = run_cli(capsys, *base, "--awq-search-tokens", "32", "-o", str(tmp_path / "few"))
    assert few.code == 0, few.err
    rec_few = json.loads((tmp_path / "few" / "qtool.json").read_text())
    assert rec_few["config"]["awq_search_tokens"] == 32
    # one search chunk instead of four: a different search, a different checkpoint
    a = (tmp_path / "auto" / "model.safetensors").read_bytes()
    b = (tmp_path / "few" / "model.safetensors").read_bytes()
    assert a != b
