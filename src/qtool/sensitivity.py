"""Per-layer sensitivity for mixed precision (``qtool.budget``): for every quantizable
linear and every candidate bit width, the KL divergence of the model's next-token
distribution from the float model's when *only that layer* is quantized (round to
nearest at that width, the run's group size and symmetry), averaged over the
calibration tokens.

The float model's log-probabilities are computed once per calibration chunk and kept in
float32 (``tokens x vocab``: float16 would add noise larger than an 8-bit layer's KL),
with every block's input hidden states of that float pass. Each measurement is then one
forward of the calibration chunks with one layer's weight swapped for its quantized
values and put back after; the blocks before the layer's own are skipped (each returns
the float input of the layer's block, which is what they would compute), so the model's
own forward runs the rest, final norm and head included, and the result is the same, bit
for bit, as the whole forward (``tests/test_sensitivity.py``) at about half its cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from qtool.models import ArchSpec, get_blocks
from qtool.rtn import rtn_quantize


def _log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits
    return torch.log_softmax(logits.float(), dim=-1)


class _Skip:
    """Stands in for the forward of a block before the measured one: returns the float
    input of the measured block for the current chunk, whatever it is given."""

    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden

    def __call__(self, hidden_states, *args, **kwargs):
        return self.hidden


def _reference(model: nn.Module, blocks: Sequence[nn.Module], chunks: Sequence[torch.Tensor]):
    """The float log-probabilities of every chunk and ``inputs[block][chunk]``: the hidden
    states each block received."""
    inputs: list[list[torch.Tensor | None]] = [[None] * len(chunks) for _ in blocks]
    current = [0]

    def recorder(index: int):
        def pre(module, args, kwargs):
            inputs[index][current[0]] = (args[0] if args else kwargs["hidden_states"]).detach()
        return pre

    handles = [b.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        ref = []
        for i, c in enumerate(chunks):
            current[0] = i
            ref.append(_log_probs(model, c))
    finally:
        for h in handles:
            h.remove()
    return ref, inputs


def _log_probs_from(model: nn.Module, blocks: Sequence[nn.Module], start: int, ids: torch.Tensor,
                    hidden: torch.Tensor | None) -> torch.Tensor:
    """The model's log-probabilities with blocks ``0..start-1`` passing ``hidden`` (the float
    input of block ``start``) instead of computing it."""
    if start == 0 or hidden is None:
        return _log_probs(model, ids)
    shadowed = [b.__dict__.get("forward") for b in blocks[:start]]
    try:
        for b in blocks[:start]:
            b.forward = _Skip(hidden)  # an instance attribute: nn.Module.__call__ runs it instead
        return _log_probs(model, ids)
    finally:
        for b, forward in zip(blocks[:start], shadowed):
            if forward is None:
                del b.forward
            else:
                b.forward = forward


def _block_index(spec: ArchSpec, names: Sequence[str]) -> int:
    """The first block that holds one of ``names`` (0 when one is outside the blocks)."""
    prefix = spec.blocks + "."
    found = [int(n[len(prefix):].split(".", 1)[0]) for n in names if n.startswith(prefix)]
    return min(found) if len(found) == len(names) else 0


def kl_per_token(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``KL(ref || q)`` per token, from log-probabilities ``[..., vocab]``."""
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


def layer_sensitivity(model: nn.Module, spec: ArchSpec, input_ids: torch.Tensor, bits_options: Sequence[int],
                      group_size: int, sym: bool, batch_size: int = 1,
                      names: Sequence[str | tuple[str, ...]] | None = None,
                      progress: Callable[[str, int, int], None] | None = None, skip_blocks: bool = True) -> dict:
    """``{item: {bits: mean KL}}`` over the calibration windows ``input_ids``
    (``[n, seqlen]``), with the model in float and one item quantized at a time. An item
    is a full linear name, or a tuple of them quantized together (linears that share an
    input, which the serving engines fuse into one layer and so give one width).
    ``names``: the items to measure (default: every linear of every block).
    ``skip_blocks=False`` runs every forward whole (the same numbers, slower)."""
    chunks = list(input_ids.split(batch_size))
    blocks = list(get_blocks(model, spec))
    ref, inputs = _reference(model, blocks, chunks)
    if names is None:
        names = [f"{spec.blocks}.{i}.{n}" for i in range(len(blocks)) for n in spec.for_block(i).linears]
    out: dict = {}
    for done, item in enumerate(names):
        members = (item,) if isinstance(item, str) else tuple(item)
        start = _block_index(spec, members) if skip_blocks else 0
        linears = [model.get_submodule(m) for m in members]
        originals = [lin.weight.data for lin in linears]
        out[item] = {}
        for bits in bits_options:
            try:
                for lin, w in zip(linears, originals):
                    qw = rtn_quantize(w.float(), bits, group_size, sym)
                    lin.weight.data = qw.dequantize(torch.float32).to(w.dtype)
                total = tokens = 0
                for j, (c, r) in enumerate(zip(chunks, ref)):
                    kl = kl_per_token(r, _log_probs_from(model, blocks, start, c, inputs[start][j]))
                    total += float(kl.sum())
                    tokens += kl.numel()
            finally:
                for lin, w in zip(linears, originals):
                    lin.weight.data = w
            out[item][bits] = total / tokens
        if progress is not None:
            progress(members[0] if len(members) == 1 else "+".join(members), done + 1, len(names))
    return out
