"""Gemma3 (the text model, ``Gemma3ForCausalLM``): the Gemma2 block (sandwich ``(1 + w)``
norms, the MLP reads ``pre_feedforward_layernorm``) plus per-head q/k RMSNorms *after* the
projections, so scaling the projections' input channels stays exact. Local
(sliding-window) and global layers get different masks and rotary tables; the pipeline
captures each block's own."""

from qtool.models.base import LLAMA_LIKE_SEQUENTIAL, ArchSpec, Producer, pre_norm_scale_groups

SPEC = ArchSpec(
    name="gemma3",
    model_types=("gemma3_text",),
    blocks="model.layers",
    sequential=LLAMA_LIKE_SEQUENTIAL,
    scale_groups=pre_norm_scale_groups(Producer.RMSNORM_ONE_PLUS, mlp_norm="pre_feedforward_layernorm"),
    attention="self_attn",
    mlp="mlp",
)
