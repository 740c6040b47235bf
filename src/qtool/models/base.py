"""Declarative description of one architecture family: where the decoder blocks are,
which linears a block holds in execution order, and which norm or linear feeds which
group of linears, and how that producer absorbs an AWQ scale. The pipeline, GPTQ
(true-sequential order) and AWQ (scale groups) read these facts; nothing else in qtool
branches on the architecture.

Every fact is checked against the real model before calibration (``qtool.models.layout``
for the execution order, ``qtool.awq.prove`` for the folds), so a wrong file is refused
instead of quantizing wrongly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from torch import nn

from qtool.models.moe import MoESpec


class Producer(str, Enum):
    """What produces the input of a scaling group, i.e. how it absorbs ``1 / s``.

    - ``LINEAR``: ``y = x W^T + b``: rows of ``W`` and ``b`` divided by ``s``.
    - ``RMSNORM``: ``y = norm(x) * w`` (Llama, Qwen, OLMo2): ``w / s``.
    - ``RMSNORM_ONE_PLUS``: ``y = norm(x) * (1 + w)`` (Gemma 1/2/3): ``w' = (1 + w) / s - 1``.
    - ``LAYERNORM``: ``y = norm(x) * w + b``: ``w / s`` and ``b / s``.

    A norm's bias, where it has one, is divided by ``s`` for every norm kind.
    """

    LINEAR = "linear"
    RMSNORM = "x*w"
    RMSNORM_ONE_PLUS = "x*(1+w)"
    LAYERNORM = "x*w+b"


@dataclass(frozen=True)
class ScaleGroup:
    """One AWQ scaling group: ``prev`` produces the input of every linear in ``linears``
    (and of nothing else), so scaling the linears' input columns by ``s`` and ``prev``'s
    output channels by ``1 / s`` leaves the block's function unchanged.

    Attributes:
        prev: module (relative to the block) whose output feeds ``linears``: a norm (a
            pre-norm, or the pre-MLP norm of a sandwich-norm block) or a linear.
        linears: the consumers whose input columns are scaled.
        module: the submodule whose output is scored during the scale search (the
            attention or MLP that consumes the group, or the single consuming linear).
        kind: how ``prev`` absorbs the scales (``Producer``).
        requires_equal_shapes: for linear->linear groups (v -> o): only valid when the
            producer's out_features (or its ``prev_rows``) equals the consumer's
            in_features (no grouped-query head repetition in between).
        prev_rows: for a fused producer (Phi-3's ``qkv_proj``, ``gate_up_proj``): a
            function of the block giving the ``[start, stop)`` output rows that feed
            ``linears`` (v's rows, up's rows); only those rows absorb ``1 / s``. None:
            every output of ``prev``.
    """

    prev: str
    linears: tuple[str, ...]
    module: str
    kind: Producer = Producer.RMSNORM
    requires_equal_shapes: bool = False
    prev_rows: Callable[[nn.Module], tuple[int, int]] | None = None

    def rows(self, block: nn.Module) -> tuple[int, int] | None:
        """The producer's ``[start, stop)`` output rows feeding the group in ``block``
        (None: all of them)."""
        return None if self.prev_rows is None else self.prev_rows(block)

    def applies_to(self, block: nn.Module) -> bool:
        """Whether the group exists in ``block``: linear->linear groups need the
        producer's outputs (its ``prev_rows``) to be the consumers' inputs one to one
        (no grouped-query head repetition between v_proj and o_proj)."""
        if not self.requires_equal_shapes:
            return True
        prev = block.get_submodule(self.prev)
        if not isinstance(prev, nn.Linear):
            return False
        rows = self.rows(block)
        width = prev.out_features if rows is None else rows[1] - rows[0]
        return all(block.get_submodule(n).in_features == width for n in self.linears)


@dataclass(frozen=True)
class ArchSpec:
    """Facts about one architecture family.

    Attributes:
        name: family name shown to users.
        model_types: ``config.model_type`` values this file covers.
        blocks: dotted path of the ``nn.ModuleList`` of decoder blocks.
        sequential: linears grouped in execution order; linears of one tuple see the same
            input, and later tuples see inputs produced by earlier (quantized) ones.
        scale_groups: AWQ scaling groups in execution order. Only exact folds belong
            here: a norm (or linear) whose output goes to these linears and nowhere else.
            A family whose norms come after attention/MLP (OLMo2) has only linear->linear
            groups.
        attention, mlp: the attention and MLP submodules, when each returns its last
            linear's output (o_proj, down_proj) as its primary output; GPTQ then replays
            cached outputs instead of re-running the block.
        no_clip: linears AWQ does not clip. Queries and keys meet in the attention
            scores, where a clipped outlier moves the softmax far more than the linear's
            own output error shows (the paper's choice).
        float_linears: ``nn.Linear`` modules of a block deliberately kept in float (e.g.
            a router); any other linear that ``sequential`` does not list is refused.
        moe: the routed experts of a mixture-of-experts family (``qtool.models.moe``):
            ``spec_for`` unfuses them into per-expert linears and lists those in
            ``sequential``; None for dense families.
        float_modules: model-level modules (full dotted paths) kept in float as a whole,
            every parameter inside them: a vision-language model's vision tower and
            projector (``qtool.models.vlm``); only the language blocks are quantized.
        auto_class: the transformers auto class that loads the family
            (``AutoModelForImageTextToText`` for vision-language models).
        block_variant: for a family whose blocks differ in their linears (DeepSeek: the
            first ``first_k_dense_replace`` blocks have a dense MLP, the others shared and
            routed experts; its attention has ``q_proj`` or ``q_a_proj``/``q_b_proj`` by
            config), a function ``(family spec, decoder config, block index) -> that
            block's spec`` (usually ``replace(spec, sequential=..., moe=...)``); None: every
            block is described by this spec. ``spec_for`` resolves it into ``per_block``.
        per_block: the resolved spec of every block (experts unfused and listed), set by
            ``spec_for`` for a family with ``block_variant``; read it through ``for_block``.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    sequential: tuple[tuple[str, ...], ...]
    scale_groups: tuple[ScaleGroup, ...]
    attention: str | None = None
    mlp: str | None = None
    no_clip: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")
    float_linears: tuple[str, ...] = ()
    moe: MoESpec | None = None
    float_modules: tuple[str, ...] = ()
    auto_class: str = "AutoModelForCausalLM"
    block_variant: Callable[[ArchSpec, Any, int], ArchSpec] | None = None
    per_block: tuple[ArchSpec, ...] = ()

    @property
    def linears(self) -> tuple[str, ...]:
        """Every quantized linear of a block, in execution order."""
        # blocks that differ have no common list: each block's is ``for_block(i).linears``
        assert not self.per_block, f"{self.name}: blocks differ, read spec.for_block(i).linears"
        return tuple(name for group in self.sequential for name in group)

    def for_block(self, index: int) -> ArchSpec:
        """The spec of block ``index``: its own for a family whose blocks differ
        (``per_block``), else this spec."""
        return self.per_block[index] if self.per_block else self


# The layout shared by the Llama lineage (Llama, Mistral, Qwen2/3, Gemma, OLMo2, ...):
# attention with q/k/v/o projections and a gated MLP, run in this order.
LLAMA_LIKE_SEQUENTIAL = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")

# linear -> linear groups of the Llama-like block: v -> o (exact: attention mixes tokens,
# not channels, within a head) and up -> down (exact: act(gate) * up is linear in up).
V_TO_O = ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", Producer.LINEAR,
                    requires_equal_shapes=True)
UP_TO_DOWN = ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", Producer.LINEAR)


def pre_norm_scale_groups(kind: Producer, attention_norm: str = "input_layernorm",
                          mlp_norm: str = "post_attention_layernorm") -> tuple[ScaleGroup, ...]:
    """The four AWQ groups of a Llama-like block whose norms sit *before* attention and
    MLP: ``attention_norm -> q/k/v``, ``v -> o``, ``mlp_norm -> gate/up``, ``up -> down``.

    Args:
        kind: the norms' kind (``Producer.RMSNORM``, ``RMSNORM_ONE_PLUS``, ``LAYERNORM``).
        mlp_norm: the norm whose output is the MLP's input: ``post_attention_layernorm``
            in Llama/Gemma (named for its place after the attention residual), but
            ``pre_feedforward_layernorm`` in Gemma2/3, whose ``post_attention_layernorm``
            normalises the attention output instead (sandwich norms).
    """
    return (
        ScaleGroup(attention_norm, QKV, "self_attn", kind),
        V_TO_O,
        ScaleGroup(mlp_norm, GATE_UP, "mlp", kind),
        UP_TO_DOWN,
    )


LLAMA_LIKE_SCALE_GROUPS = pre_norm_scale_groups(Producer.RMSNORM)


def _second_half(block: nn.Module) -> tuple[int, int]:
    # ``gate_up_proj`` rows: [gate: I | up: I]; the MLP computes act(gate) * up
    rows = block.get_submodule("mlp.gate_up_proj").out_features
    return rows // 2, rows


# fused gate/up (Phi-3, GLM): up's rows of ``gate_up_proj`` -> down (exact as up -> down)
FUSED_UP_TO_DOWN = ScaleGroup("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", Producer.LINEAR,
                              prev_rows=_second_half)
