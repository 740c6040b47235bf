"""Cohere (``cohere``, Command-R): a *parallel* block, ``x + attn(ln(x)) + mlp(ln(x))``,
with one weight-only LayerNorm feeding q/k/v and gate/up together. qtool's scale search
scores one module per group, and this norm's group spans attention and MLP, so AWQ keeps
the exact linear->linear groups only: v -> o (without grouped-query repetition) and
up -> down. Attention runs its linears before the MLP's, in Llama's order."""

from qtool.models.base import LLAMA_LIKE_SEQUENTIAL, UP_TO_DOWN, V_TO_O, ArchSpec

SPEC = ArchSpec(
    name="cohere",
    model_types=("cohere",),
    blocks="model.layers",
    sequential=LLAMA_LIKE_SEQUENTIAL,
    scale_groups=(V_TO_O, UP_TO_DOWN),
    attention="self_attn",
    mlp="mlp",
)
