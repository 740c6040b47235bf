"""OLMoE: pre-norm attention with q/k RMSNorms over the whole projections and a sparse
MoE MLP (router ``mlp.gate`` in float, routed experts unfused per expert,
``qtool.models.moe``), saved as ``mlp.experts.{e}.gate_proj`` etc."""

from qtool.models.base import QKV, ArchSpec
from qtool.models.moe import MoESpec

SPEC = ArchSpec(
    name="olmoe",
    model_types=("olmoe",),
    blocks="model.layers",
    sequential=(QKV, ("self_attn.o_proj",)),
    scale_groups=(),
    attention="self_attn",
    moe=MoESpec(),
)
