"""Qwen3-MoE: Qwen3 attention (per-head q/k norms) and a sparse MoE MLP (router
``mlp.gate`` in float, routed experts unfused per expert, ``qtool.models.moe``), saved as
``mlp.experts.{e}.gate_proj`` etc., the names vLLM's Qwen-MoE loaders read. Every layer
must be sparse (``mlp_only_layers`` empty, ``decoder_sparse_step`` 1); others are refused."""

from qtool.models.base import QKV, ArchSpec
from qtool.models.moe import MoESpec

SPEC = ArchSpec(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    blocks="model.layers",
    sequential=(QKV, ("self_attn.o_proj",)),
    scale_groups=(),
    attention="self_attn",
    moe=MoESpec(),
)
