"""SmolLM3 (``smollm3``): a Llama block in which some layers skip rotary embeddings
(NoPE); the position encoding acts inside attention, so the Llama folds hold."""

from qtool.models.base import LLAMA_LIKE_SCALE_GROUPS, LLAMA_LIKE_SEQUENTIAL, ArchSpec

SPEC = ArchSpec(
    name="smollm3",
    model_types=("smollm3",),
    blocks="model.layers",
    sequential=LLAMA_LIKE_SEQUENTIAL,
    scale_groups=LLAMA_LIKE_SCALE_GROUPS,
    attention="self_attn",
    mlp="mlp",
)
