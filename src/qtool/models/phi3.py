"""Phi-3 / Phi-4 (``phi3``): Llama's pre-norm block with fused projections. ``qkv_proj``
holds q, k and v as rows ``[q: heads*d | k: kv*d | v: kv*d]`` and ``gate_up_proj`` holds
``[gate: I | up: I]`` (the MLP computes ``act(gate) * up``). The norms feed the fused
linears whole; the linear->linear groups fold into the producer's row range only: v's
rows of ``qkv_proj`` -> ``o_proj`` (without grouped-query repetition) and up's rows of
``gate_up_proj`` -> ``down_proj``. Queries and keys share ``qkv_proj``, so it is not clipped."""

from torch import nn

from qtool.models.base import FUSED_UP_TO_DOWN, ArchSpec, Producer, ScaleGroup


def _v_rows(block: nn.Module) -> tuple[int, int]:
    attn = block.self_attn
    rows = attn.qkv_proj.out_features
    return rows - attn.num_key_value_heads * attn.head_dim, rows


SPEC = ArchSpec(
    name="phi3",
    model_types=("phi3",),
    blocks="model.layers",
    sequential=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    scale_groups=(
        ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
        ScaleGroup("self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj", Producer.LINEAR,
                   requires_equal_shapes=True, prev_rows=_v_rows),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
        FUSED_UP_TO_DOWN,
    ),
    attention="self_attn",
    mlp="mlp",
    no_clip=("self_attn.qkv_proj",),
)
