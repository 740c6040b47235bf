"""Llama (and SmolLM2, which is a Llama): pre-norm GQA attention + SwiGLU MLP."""

from qtool.models.base import LLAMA_LIKE_SCALE_GROUPS, LLAMA_LIKE_SEQUENTIAL, ArchSpec

SPEC = ArchSpec(
    name="llama",
    model_types=("llama",),
    blocks="model.layers",
    sequential=LLAMA_LIKE_SEQUENTIAL,
    scale_groups=LLAMA_LIKE_SCALE_GROUPS,
    attention="self_attn",
    mlp="mlp",
)
