"""gpt-oss: attention with q/k/v/o biases and per-head sinks (a learned logit each head's
softmax also normalises over), sliding-window and full layers alternating (the pipeline
gives each block the mask the model's forward gives it), and a sparse MoE MLP in every
block: the router ``mlp.router`` (with a bias, kept in float) and routed experts with
biases and a clamped SwiGLU, ``(clamp(up, -l, l) + 1) * g * sigmoid(alpha * g)`` with
``g = clamp(gate, max=l)``.

transformers stores the experts transposed, gate and up interleaved (``gate_up_proj``
``[E, H, 2I]``, gate at even, up at odd columns); ``qtool.models.moe`` unfuses them into
per-expert ``gate_proj``/``up_proj``/``down_proj`` linears with their biases, running the
module's own gating. Saved as ``mlp.experts.{e}.gate_proj`` etc. (biases beside them), the
per-expert naming of vLLM's fused-MoE expert mapping: no serving engine or transformers
(5.24) defines a per-expert naming for gpt-oss, whose own checkpoints keep the experts
fused, so transformers does not load these per-expert checkpoints (qtool does). AWQ is
refused for MoE families (``qtool.models.moe.check_method``)."""

from qtool.models.base import QKV, ArchSpec
from qtool.models.moe import MoESpec

SPEC = ArchSpec(
    name="gpt_oss",
    model_types=("gpt_oss",),
    blocks="model.layers",
    sequential=(QKV, ("self_attn.o_proj",)),
    scale_groups=(),
    attention="self_attn",
    moe=MoESpec(router="mlp.router"),
)
