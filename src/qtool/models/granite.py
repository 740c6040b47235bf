"""Granite (``granite``, IBM Granite 3.x dense): Llama's names and pre-norm block, plus
scalar multipliers (embedding, attention scores, residual branches, logits). Scalars act
on whole tensors, so every Llama fold stays exact."""

from qtool.models.base import LLAMA_LIKE_SCALE_GROUPS, LLAMA_LIKE_SEQUENTIAL, ArchSpec

SPEC = ArchSpec(
    name="granite",
    model_types=("granite",),
    blocks="model.layers",
    sequential=LLAMA_LIKE_SEQUENTIAL,
    scale_groups=LLAMA_LIKE_SCALE_GROUPS,
    attention="self_attn",
    mlp="mlp",
)
