"""DeepSeek-V2 / V3: multi-head latent attention (MLA) and, after the first
``first_k_dense_replace`` blocks (a dense gated MLP), a mixture-of-experts MLP with shared
experts, so the blocks of one model differ in their linears (``block_variant``).

MLA, in execution order: the query from ``q_proj`` (V2-Lite, ``q_lora_rank`` None) or from
``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj``; the compressed key/value latent and the
shared rotary key from ``kv_a_proj_with_mqa`` -> ``kv_a_layernorm`` -> ``kv_b_proj``
(per-head keys and values); then ``o_proj``. The MoE MLP runs the router ``mlp.gate``
(kept in float, with V3's ``e_score_correction_bias``), the routed experts (unfused per
expert, ``qtool.models.moe``), then the shared experts ``mlp.shared_experts`` on the same
input. Saved as ``mlp.experts.{e}.gate_proj`` etc., the names of the original
checkpoints, which vLLM's DeepSeek loader and transformers read. AWQ is refused for MoE
families (``qtool.models.moe.check_method``)."""

from dataclasses import replace

from qtool.models.base import ArchSpec
from qtool.models.moe import MoESpec

# q_proj and kv_a_proj_with_mqa read the normed block input one after the other; with a
# query LoRA, q_b_proj runs between q_a_proj and kv_a_proj_with_mqa, so they are separate groups
MLA = (("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"), ("self_attn.kv_b_proj",), ("self_attn.o_proj",))
MLA_Q_LORA = (("self_attn.q_a_proj",), ("self_attn.q_b_proj",), ("self_attn.kv_a_proj_with_mqa",),
              ("self_attn.kv_b_proj",), ("self_attn.o_proj",))
DENSE_MLP = (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
SHARED_EXPERTS = (("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"), ("mlp.shared_experts.down_proj",))


def _block(spec: ArchSpec, config, index: int) -> ArchSpec:
    attention = MLA if config.q_lora_rank is None else MLA_Q_LORA
    if index < config.first_k_dense_replace:
        return replace(spec, sequential=attention + DENSE_MLP, moe=None)
    return replace(spec, sequential=attention + SHARED_EXPERTS)


SPEC = ArchSpec(
    name="deepseek",
    model_types=("deepseek_v2", "deepseek_v3"),
    blocks="model.layers",
    sequential=MLA_Q_LORA + SHARED_EXPERTS,  # a V3 MoE block; each block's own comes from _block
    scale_groups=(),
    attention="self_attn",
    no_clip=("self_attn.q_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj"),
    moe=MoESpec(after="self_attn.o_proj"),
    block_variant=_block,
)
