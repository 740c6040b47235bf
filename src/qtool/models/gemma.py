"""Gemma: the Llama block (pre-norm attention, gated GELU MLP) with Gemma RMSNorms, which
compute ``norm(x) * (1 + w)``: a scale is folded as ``w' = (1 + w) / s - 1``."""

from qtool.models.base import LLAMA_LIKE_SEQUENTIAL, ArchSpec, Producer, pre_norm_scale_groups

SPEC = ArchSpec(
    name="gemma",
    model_types=("gemma",),
    blocks="model.layers",
    sequential=LLAMA_LIKE_SEQUENTIAL,
    scale_groups=pre_norm_scale_groups(Producer.RMSNORM_ONE_PLUS),
    attention="self_attn",
    mlp="mlp",
)
