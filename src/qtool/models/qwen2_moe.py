"""Qwen2-MoE (Qwen1.5-MoE): Qwen2 attention (q/k/v biases) and a sparse MoE MLP with a
shared expert: ``mlp.shared_expert`` (gate/up/down, quantized like a dense MLP, run
before the routed experts) scaled by ``sigmoid(mlp.shared_expert_gate(x))``. The router
``mlp.gate`` and the one-row ``shared_expert_gate`` stay in float; routed experts are
unfused per expert (``qtool.models.moe``) and saved as ``mlp.experts.{e}.gate_proj`` etc."""

from qtool.models.base import QKV, ArchSpec
from qtool.models.moe import MoESpec

SHARED = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")

SPEC = ArchSpec(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    blocks="model.layers",
    sequential=(QKV, ("self_attn.o_proj",), SHARED, ("mlp.shared_expert.down_proj",)),
    scale_groups=(),
    attention="self_attn",
    float_linears=("mlp.shared_expert_gate",),
    moe=MoESpec(),
)
