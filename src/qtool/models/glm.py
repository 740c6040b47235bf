"""GLM (``glm``, GLM-4-9B) and GLM-4 (``glm4``, GLM-4-0414): q/k/v with biases, a fused
``gate_up_proj`` (``[gate: I | up: I]``) and partial rotary embeddings. GLM-4 adds
sandwich norms: ``post_self_attn_layernorm`` and ``post_mlp_layernorm`` normalise the
attention and MLP *outputs*; the MLP still reads ``post_attention_layernorm``. Up's rows
of ``gate_up_proj`` fold into ``down_proj``."""

from qtool.models.base import (FUSED_UP_TO_DOWN, QKV, V_TO_O, ArchSpec, ScaleGroup)

SPEC = ArchSpec(
    name="glm",
    model_types=("glm", "glm4"),
    blocks="model.layers",
    sequential=(QKV, ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    scale_groups=(
        ScaleGroup("input_layernorm", QKV, "self_attn"),
        V_TO_O,
        ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
        FUSED_UP_TO_DOWN,
    ),
    attention="self_attn",
    mlp="mlp",
)
