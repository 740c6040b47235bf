"""Declarative description of one architecture family: where the decoder blocks are,
which linears a block holds in execution order, and which norm or linear feeds which
group of linears. The pipeline, GPTQ (true-sequential order) and AWQ (scale groups) read
these facts; nothing else in qtool branches on the architecture."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScaleGroup:
    """One AWQ scaling group: ``prev`` produces the input of every linear in ``linears``.

    Attributes:
        prev: module (relative to the block) whose output feeds ``linears``: an RMSNorm /
            LayerNorm (scale folded into its weight) or a linear (folded into its rows).
        linears: the consumers whose input columns are scaled.
        module: the submodule whose output is scored during the scale search (the
            attention or MLP that consumes the group, or the single consuming linear).
        requires_equal_shapes: for linear->linear groups (v -> o): only valid when the
            producer's out_features equals the consumer's in_features (no grouped-query
            head repetition in between).
    """

    prev: str
    linears: tuple[str, ...]
    module: str
    requires_equal_shapes: bool = False


@dataclass(frozen=True)
class ArchSpec:
    """Facts about one architecture family.

    Attributes:
        name: family name shown to users.
        model_types: ``config.model_type`` values this file covers.
        blocks: dotted path of the ``nn.ModuleList`` of decoder blocks.
        sequential: linears grouped in execution order; linears of one tuple see the same
            input, and later tuples see inputs produced by earlier (quantized) ones.
        scale_groups: AWQ scaling groups in execution order.
        no_clip: linears AWQ does not clip. Queries and keys meet in the attention
            scores, where a clipped outlier moves the softmax far more than the linear's
            own output error shows (the paper's choice).
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    sequential: tuple[tuple[str, ...], ...]
    scale_groups: tuple[ScaleGroup, ...]
    attention: str | None = None
    mlp: str | None = None
    no_clip: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")

    @property
    def linears(self) -> tuple[str, ...]:
        """Every quantized linear of a block, in execution order."""
        return tuple(name for group in self.sequential for name in group)


# The layout shared by the Llama lineage (Llama, Mistral, Qwen2/3, ...): pre-norm
# attention with q/k/v/o projections and a gated MLP.
LLAMA_LIKE_SEQUENTIAL = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

LLAMA_LIKE_SCALE_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", requires_equal_shapes=True),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)
