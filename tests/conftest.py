"""Shared fixtures: mini random-init models of every registered family (no download),
the default model's tokenizer, and the paths of ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WIKITEXT_TEST = SHARED / "data" / "wikitext-2-raw-v1" / "test.jsonl"
REFVECTORS = SHARED / "refvectors"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

MINI_FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
}


def mini_config(family: str, **overrides):
    import transformers

    cls_name, extra = MINI_FAMILIES[family]
    kwargs = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    kwargs.update(extra)
    kwargs.update(overrides)
    return getattr(transformers, cls_name)(**kwargs)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The cached float32 HF folder of the built-in default model (converted once)."""
    from qtool.loading import default_model_folder

    return default_model_folder()


def make_mini_model(folder: Path, family: str, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(mini_config(family, **overrides), dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def mini_models(tmp_path_factory, default_model_dir) -> dict[str, Path]:
    """One saved mini model folder per registered family."""
    root = tmp_path_factory.mktemp("mini")
    return {fam: make_mini_model(root / fam, fam, default_model_dir) for fam in MINI_FAMILIES}


@pytest.fixture(scope="session")
def mini_llama(mini_models) -> Path:
    return mini_models["llama"]


@pytest.fixture()
def calib_txt(tmp_path) -> Path:
    """A small calibration text written for the tests."""
    lines = [f"Sample {i}: the quick brown fox {i * 7 % 13} jumps over {i} lazy dogs; def f(x): return x * {i}." for i in range(400)]
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
