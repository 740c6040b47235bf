"""Mixtral: Llama-like attention and a sparse MoE MLP (top-k router ``mlp.gate``, kept in
float; routed experts unfused per expert, ``qtool.models.moe``). The checkpoint keeps
Mixtral's own names, which vLLM's and transformers' Mixtral loaders read:
``block_sparse_moe.gate`` and ``block_sparse_moe.experts.{e}.w1`` (gate), ``w3`` (up),
``w2`` (down). AWQ is refused for MoE families (``qtool.api.plan``)."""

from qtool.models.base import QKV, ArchSpec
from qtool.models.moe import MoESpec

SPEC = ArchSpec(
    name="mixtral",
    model_types=("mixtral",),
    blocks="model.layers",
    sequential=(QKV, ("self_attn.o_proj",)),
    scale_groups=(),
    attention="self_attn",
    moe=MoESpec(disk_names=(
        ("mlp.experts.{e}.gate_proj", "block_sparse_moe.experts.{e}.w1"),
        ("mlp.experts.{e}.up_proj", "block_sparse_moe.experts.{e}.w3"),
        ("mlp.experts.{e}.down_proj", "block_sparse_moe.experts.{e}.w2"),
        ("mlp.gate", "block_sparse_moe.gate"),
    )),
)
