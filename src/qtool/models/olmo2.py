"""OLMo2: norms *after* attention and MLP (``post_attention_layernorm``,
``post_feedforward_layernorm`` normalise the outputs before the residual add) and q/k
RMSNorms over the whole projections. Q/K/V and gate/up read the raw residual stream, which
no norm produces, so AWQ has no norm groups here; the exact groups are the linear->linear
ones: v -> o (no norm on v; only without grouped-query repetition) and up -> down."""

from qtool.models.base import LLAMA_LIKE_SEQUENTIAL, UP_TO_DOWN, V_TO_O, ArchSpec

SPEC = ArchSpec(
    name="olmo2",
    model_types=("olmo2",),
    blocks="model.layers",
    sequential=LLAMA_LIKE_SEQUENTIAL,
    scale_groups=(V_TO_O, UP_TO_DOWN),
    attention="self_attn",
    mlp="mlp",
)
