"""Qwen3: the Llama block plus per-head RMSNorm on q and k *after* the projections, so
scaling the projections' input channels (input_layernorm -> q/k/v) stays exact."""

from qtool.models.base import LLAMA_LIKE_SCALE_GROUPS, LLAMA_LIKE_SEQUENTIAL, ArchSpec

SPEC = ArchSpec(
    name="qwen3",
    model_types=("qwen3",),
    blocks="model.layers",
    sequential=LLAMA_LIKE_SEQUENTIAL,
    scale_groups=LLAMA_LIKE_SCALE_GROUPS,
    attention="self_attn",
    mlp="mlp",
)
