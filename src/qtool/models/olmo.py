"""OLMo (``olmo``, the first OLMo): Llama's names with *non-parametric* LayerNorms (no
weight, no bias), which cannot absorb a scale. AWQ keeps only the linear->linear groups:
v -> o (without grouped-query repetition) and up -> down."""

from qtool.models.base import LLAMA_LIKE_SEQUENTIAL, UP_TO_DOWN, V_TO_O, ArchSpec

SPEC = ArchSpec(
    name="olmo",
    model_types=("olmo",),
    blocks="model.layers",
    sequential=LLAMA_LIKE_SEQUENTIAL,
    scale_groups=(V_TO_O, UP_TO_DOWN),
    attention="self_attn",
    mlp="mlp",
)
