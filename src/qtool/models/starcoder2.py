"""StarCoder2 (``starcoder2``): LayerNorms with bias before attention and MLP, linears
with biases, and a non-gated MLP ``c_proj(gelu(c_fc(x)))``. The norms absorb scales
(weight and bias); gelu sits between ``c_fc`` and ``c_proj``, so that pair has no exact
fold and no group."""

from qtool.models.base import QKV, V_TO_O, ArchSpec, Producer, ScaleGroup

SPEC = ArchSpec(
    name="starcoder2",
    model_types=("starcoder2",),
    blocks="model.layers",
    sequential=(QKV, ("self_attn.o_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    scale_groups=(
        ScaleGroup("input_layernorm", QKV, "self_attn", Producer.LAYERNORM),
        V_TO_O,
        ScaleGroup("post_attention_layernorm", ("mlp.c_fc",), "mlp", Producer.LAYERNORM),
    ),
    attention="self_attn",
    mlp="mlp",
)
