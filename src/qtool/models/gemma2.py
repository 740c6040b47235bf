"""Gemma2: sandwich norms. ``input_layernorm`` feeds q/k/v; ``post_attention_layernorm``
normalises the attention *output* (before the residual add), and the MLP reads
``pre_feedforward_layernorm``; ``post_feedforward_layernorm`` normalises the MLP output.
All are ``(1 + w)`` RMSNorms. Attention-logit softcapping and sliding-window layers act on
the scores, so scaling q/k/v inputs and v -> o stays exact."""

from qtool.models.base import LLAMA_LIKE_SEQUENTIAL, ArchSpec, Producer, pre_norm_scale_groups

SPEC = ArchSpec(
    name="gemma2",
    model_types=("gemma2",),
    blocks="model.layers",
    sequential=LLAMA_LIKE_SEQUENTIAL,
    scale_groups=pre_norm_scale_groups(Producer.RMSNORM_ONE_PLUS, mlp_norm="pre_feedforward_layernorm"),
    attention="self_attn",
    mlp="mlp",
)
