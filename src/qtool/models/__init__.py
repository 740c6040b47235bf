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
from qtool.models import mixtral, olmoe, qwen2_moe, qwen3_moe  # mixture-of-experts
from qtool.models import gemma3_vl, llava, qwen2_vl  # vision-language: language blocks only
from qtool.models.base import ArchSpec, Producer, ScaleGroup

log = logging.getLogger(__name__)

FAMILIES: tuple[ArchSpec, ...] = (
    llama.SPEC, mistral.SPEC, qwen2.SPEC, qwen3.SPEC, gemma.SPEC, gemma2.SPEC, gemma3.SPEC, olmo2.SPEC,
    phi3.SPEC, granite.SPEC, olmo.SPEC, smollm3.SPEC, starcoder2.SPEC, glm.SPEC, cohere.SPEC,
    mixtral.SPEC, qwen2_moe.SPEC, qwen3_moe.SPEC, olmoe.SPEC,
    qwen2_vl.SPEC, gemma3_vl.SPEC, llava.SPEC,
)

__all__ = ["ArchSpec", "Producer", "ScaleGroup", "FAMILIES", "spec_for", "get_blocks", "is_registered",
           "supported_model_types"]


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
    for block in blocks:
        for name in spec.linears:
            try:
                if not isinstance(block.get_submodule(name), nn.Linear):
                    return False
            except AttributeError:
                return False
    return True


def spec_for(model: nn.Module) -> ArchSpec:
    """The ``ArchSpec`` of ``model`` (a transformers ``PreTrainedModel``). For an MoE
    family the fused experts of ``model`` are first unfused in place into per-expert
    linears (same function, ``qtool.models.moe``) and the returned spec lists them."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for spec in FAMILIES:
        if model_type in spec.model_types:
            if spec.moe is not None:
                from qtool.models.moe import prepare_experts

                spec = prepare_experts(model, spec)
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
