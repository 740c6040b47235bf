"""Vision-language models: only the language model's decoder blocks are quantized; the
vision tower and the projector (``ArchSpec.float_modules``) stay in float, reported in the
coverage line as kept for that reason.

- Loading: a family file names its transformers auto class (``ArchSpec.auto_class``);
  ``auto_model_class(config)`` picks it by ``config.model_type``, so a VLM is loaded as
  its ``...ForConditionalGeneration`` class (``AutoModelForImageTextToText``), never as a
  text-only model that would drop the vision tower.
- Names on disk: transformers 5 builds VLMs with ``model.language_model.*`` /
  ``model.visual.*`` modules but ``save_pretrained`` writes the names of the published
  checkpoints (Qwen2-VL: ``model.layers.*``, ``visual.*``; Gemma3/LLaVA:
  ``language_model.model.*``, ``vision_tower.*``, ``multi_modal_projector.*``), reversing
  its own conversion mapping; ``disk_renamer`` applies that same reversal (transformers'
  ``revert_weight_conversion``) to every tensor and quantized module name, and
  ``model_names`` maps a checkpoint's names back to the model's, so qtool's checkpoints
  carry the key names transformers, vLLM and the source checkpoint use.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

IMAGE_TEXT = "AutoModelForImageTextToText"
CAUSAL_LM = "AutoModelForCausalLM"


def _family(model_type: str | None):
    from qtool.models import FAMILIES

    return next((spec for spec in FAMILIES if model_type in spec.model_types), None)


def auto_class_name(config) -> str:
    """The transformers auto class of ``config``'s family (``AutoModelForCausalLM`` for
    text models and unregistered types)."""
    spec = _family(getattr(config, "model_type", None))
    return CAUSAL_LM if spec is None else spec.auto_class


def auto_model_class(config):
    """The transformers auto class object that builds or loads ``config``'s model."""
    import transformers

    return getattr(transformers, auto_class_name(config))


def is_vlm(model: nn.Module) -> bool:
    """Whether ``model`` belongs to a family that keeps modules in float as a whole (a
    vision-language model)."""
    spec = _family(getattr(getattr(model, "config", None), "model_type", None))
    return spec is not None and bool(spec.float_modules)


def disk_renamer(model: nn.Module) -> Callable[[str], str]:
    """Full tensor or module name of ``model`` -> the name ``save_pretrained`` writes for
    it (the identity outside vision-language families)."""
    if not is_vlm(model):
        return lambda key: key
    from transformers.core_model_loading import revert_weight_conversion

    cache: dict[str, str] = {}
    probe = next(model.parameters())

    def rename(key: str) -> str:
        if key not in cache:
            cache[key] = next(iter(revert_weight_conversion(model, {key: probe})))
        return cache[key]

    return rename


def model_names(model: nn.Module, qweights: dict, plain: dict) -> tuple[dict, dict]:
    """A checkpoint's quantized layers (``qweights`` by module) and plain tensors
    (``plain`` by tensor name) renamed from the disk naming to ``model``'s own (names
    already in the model's naming are kept)."""
    if not is_vlm(model):
        return qweights, plain
    rename = disk_renamer(model)
    back: dict[str, str] = {}
    for key in model.state_dict():
        back[rename(key)] = key
        module, _, leaf = key.rpartition(".")
        if leaf == "weight":
            back[rename(module)] = module
    return {back.get(k, k): v for k, v in qweights.items()}, {back.get(k, k): v for k, v in plain.items()}


def ignore_patterns(model: nn.Module) -> list[str]:
    """compressed-tensors ``ignore`` entries for the modules kept in float as a whole,
    each under the model's names (what transformers matches at load time) and under the
    names on disk (``disk_renamer``): ``re:`` prefixes, matched from the start of a
    module name. Empty outside vision-language families."""
    import re

    if not is_vlm(model):
        return []
    spec = _family(model.config.model_type)
    rename = disk_renamer(model)
    out: list[str] = []
    for module in spec.float_modules:
        for name in (module, rename(module)):
            pattern = f"re:^{re.escape(name)}\\."
            if pattern not in out:
                out.append(pattern)
    return out


def folder_ignore_patterns(folder) -> list[str]:
    """``ignore_patterns`` of the model whose ``config.json`` is in ``folder``, built on the
    meta device (no weights read); empty outside vision-language families. For writers
    without a model (``qtool convert``)."""
    import torch
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError):  # an architecture transformers does not know: not a registered VLM
        return []
    spec = _family(getattr(config, "model_type", None))
    if spec is None or not spec.float_modules:
        return []
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        return ignore_patterns(auto_model_class(config).from_config(config))
