"""Per-layer sensitivity for mixed precision (``qtool.budget``): for every quantizable
linear and every candidate bit width, the KL divergence of the model's next-token
distribution from the float model's when *only that layer* is quantized (round to
nearest at that width, the run's group size and symmetry), averaged over the
calibration tokens.

The float model's log-probabilities are computed once per calibration chunk and kept in
float32 (``tokens x vocab``: float16 would add noise larger than an 8-bit layer's KL);
each measurement is then one forward of the calibration
chunks with one layer's weight swapped for its quantized values and put back after.
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


def kl_per_token(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``KL(ref || q)`` per token, from log-probabilities ``[..., vocab]``."""
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


def layer_sensitivity(model: nn.Module, spec: ArchSpec, input_ids: torch.Tensor, bits_options: Sequence[int],
                      group_size: int, sym: bool, batch_size: int = 1,
                      names: Sequence[str | tuple[str, ...]] | None = None,
                      progress: Callable[[str, int, int], None] | None = None) -> dict:
    """``{item: {bits: mean KL}}`` over the calibration windows ``input_ids``
    (``[n, seqlen]``), with the model in float and one item quantized at a time. An item
    is a full linear name, or a tuple of them quantized together (linears that share an
    input, which the serving engines fuse into one layer and so give one width).
    ``names``: the items to measure (default: every linear of every block)."""
    chunks = list(input_ids.split(batch_size))
    ref = [_log_probs(model, c) for c in chunks]
    if names is None:
        names = [f"{spec.blocks}.{i}.{n}" for i, _ in enumerate(get_blocks(model, spec)) for n in spec.for_block(i).linears]
    out: dict = {}
    for done, item in enumerate(names):
        members = (item,) if isinstance(item, str) else tuple(item)
        linears = [model.get_submodule(m) for m in members]
        originals = [lin.weight.data for lin in linears]
        out[item] = {}
        for bits in bits_options:
            try:
                for lin, w in zip(linears, originals):
                    qw = rtn_quantize(w.float(), bits, group_size, sym)
                    lin.weight.data = qw.dequantize(torch.float32).to(w.dtype)
                total = tokens = 0
                for c, r in zip(chunks, ref):
                    kl = kl_per_token(r, _log_probs(model, c))
                    total += float(kl.sum())
                    tokens += kl.numel()
            finally:
                for lin, w in zip(linears, originals):
                    lin.weight.data = w
            out[item][bits] = total / tokens
        if progress is not None:
            progress(members[0] if len(members) == 1 else "+".join(members), done + 1, len(names))
    return out
