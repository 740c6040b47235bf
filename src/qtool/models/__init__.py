"""Architecture registry: one declarative file per family, one line here per file.

``spec_for(model)`` finds the family by ``config.model_type``. An unknown type gets the
*generic Llama-like fallback* only when the model really has that layout (every block has
the Llama module names with linear layers at each of them); otherwise the error lists the
supported families. The fallback is provisional: before calibration,
``qtool.models.layout`` checks the order in which the block really runs its linears, and
for AWQ ``qtool.awq.prove`` checks every fold, so a model that only shares Llama's names
is refused in one line instead of being quantized wrongly.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch.nn as nn

from qtool.errors import UnsupportedError
from qtool.models import (cohere, gemma, gemma2, gemma3, glm, granite, llama, mistral, olmo, olmo2, phi3, qwen2, qwen3,
                          smollm3, starcoder2)
from qtool.models import deepseek, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe  # mixture-of-experts
from qtool.models import gemma3_vl, llava, qwen2_vl  # vision-language: language blocks only
from qtool.models.base import ArchSpec, Producer, ScaleGroup

log = logging.getLogger(__name__)

FAMILIES: tuple[ArchSpec, ...] = (
    llama.SPEC, mistral.SPEC, qwen2.SPEC, qwen3.SPEC, gemma.SPEC, gemma2.SPEC, gemma3.SPEC, olmo2.SPEC,
    phi3.SPEC, granite.SPEC, olmo.SPEC, smollm3.SPEC, starcoder2.SPEC, glm.SPEC, cohere.SPEC,
    mixtral.SPEC, qwen2_moe.SPEC, qwen3_moe.SPEC, olmoe.SPEC, deepseek.SPEC, gpt_oss.SPEC,
    qwen2_vl.SPEC, gemma3_vl.SPEC, llava.SPEC,
)

__all__ = ["ArchSpec", "Producer", "ScaleGroup", "FAMILIES", "spec_for", "resolve_blocks", "get_blocks",
           "is_registered", "supported_model_types"]


def supported_model_types() -> list[str]:
    return sorted(t for spec in FAMILIES for t in spec.model_types)


def is_registered(spec: ArchSpec) -> bool:
    """Whether ``spec`` comes from a family file (not the generic Llama-like fallback);
    an MoE family's spec with its experts listed (``spec_for``) counts as its file's."""
    return any(spec.name == family.name for family in FAMILIES)


def get_blocks(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    """The decoder blocks of ``model`` at ``spec.blocks``."""
    return model.get_submodule(spec.blocks)


def _has_layout(model: nn.Module, spec: ArchSpec) -> bool:
    try:
        blocks = get_blocks(model, spec)
    except AttributeError:
        return False
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        return False
    for i, block in enumerate(blocks):
        for name in spec.for_block(i).linears:
            try:
                if not isinstance(block.get_submodule(name), nn.Linear):
                    return False
            except AttributeError:
                return False
    return True


def resolve_blocks(model: nn.Module, spec: ArchSpec) -> ArchSpec:
    """``spec`` made exact for ``model``'s blocks: with ``block_variant``, every block's own
    spec in ``per_block`` (read with ``spec.for_block(i)``); in every MoE block the fused
    experts unfused in place into per-expert linears (same function, ``qtool.models.moe``)
    and listed. A family without either comes back unchanged.

    Raises:
        UnsupportedError: a block the family file calls MoE without an experts module, or
            experts qtool cannot unfuse.
    """
    from qtool.models.moe import expand_spec, prepare_experts, unfuse_experts

    if spec.block_variant is None:
        return spec if spec.moe is None else prepare_experts(model, spec)
    config = model.config.get_text_config()
    per_block = []
    for i, block in enumerate(get_blocks(model, spec)):
        variant = replace(spec.block_variant(spec, config, i), block_variant=None)
        if variant.moe is not None:
            variant = expand_spec(variant, unfuse_experts(block, variant.moe))
        per_block.append(variant)
    return replace(spec, per_block=tuple(per_block))


def spec_for(model: nn.Module) -> ArchSpec:
    """The ``ArchSpec`` of ``model`` (a transformers ``PreTrainedModel``), resolved for its
    blocks (``resolve_blocks``: per-block specs, MoE experts unfused in place and listed)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for spec in FAMILIES:
        if model_type in spec.model_types:
            spec = resolve_blocks(model, spec)
            if not _has_layout(model, spec):
                raise UnsupportedError(
                    f"model_type '{model_type}' does not have the module layout qtool's "
                    f"'{spec.name}' file describes; please report this model"
                )
            return spec
    generic = replace(llama.SPEC, name=f"generic-llama-like ({model_type})", model_types=(str(model_type),))
    if _has_layout(model, generic):
        log.warning("architecture '%s' is not registered; trying the generic Llama-like layout (checked on the model "
                    "before calibration)", model_type)
        return generic
    raise UnsupportedError(
        f"unsupported architecture '{model_type}': qtool supports {', '.join(supported_model_types())} "
        "(and Llama-like models with the same module names); add a file under qtool/models/ for it"
    )
