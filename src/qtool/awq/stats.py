"""Calibration statistics of one block for AWQ, gathered in one float forward pass.

For every distinct linear input of the block (the input shared by q/k/v, by gate/up, and
the inputs of o_proj and down_proj) this keeps

- ``mean_abs``: mean |x| per input channel over *all* calibration tokens (the AWQ
  activation salience), streamed chunk by chunk in float32;
- ``gram``: ``X^T X`` over the *search subsample* (the first calibration chunks), the
  exact quadratic form of a linear's output error, used by the linear-only scale search
  and by the clip search.

With several processes (``qtool.distributed``) each sees its own chunks and the sums
(per-channel |x|, Gram matrices, token counts) are added over the processes before use.

For every scored non-linear module (attention, MLP) it keeps the exact positional and
keyword arguments the block called it with on the search chunks, so the search can
re-run that module alone (with masks and rotary tables) instead of the whole block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from qtool import distributed


@dataclass
class InputStats:
    """Statistics of the input ``x`` of the linears that read it.

    Attributes:
        mean_abs: float32 ``[k]``, mean |x| per input channel over every calibration token.
        gram: float32 ``[k, k]``, ``sum_t x_t x_t^T`` over the search tokens.
        num_tokens: calibration tokens in ``mean_abs``.
        search_tokens: tokens in ``gram``.
    """

    mean_abs: torch.Tensor
    gram: torch.Tensor
    num_tokens: int
    search_tokens: int


class _InputAccumulator:
    def __init__(self, search_chunks: int):
        self.search_chunks = search_chunks
        self.calls = 0
        self.abs_sum: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None
        self.num_tokens = 0
        self.search_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [t, k]
        # float32 within a chunk, float64 across chunks
        part = x.abs().sum(dim=0).double()
        self.abs_sum = part if self.abs_sum is None else self.abs_sum + part
        self.num_tokens += x.shape[0]
        if self.calls < self.search_chunks:
            g = x.T @ x  # [k, k]
            self.gram = g if self.gram is None else self.gram + g
            self.search_tokens += x.shape[0]
        self.calls += 1

    def result(self) -> InputStats:
        assert self.abs_sum is not None
        if distributed.current().size > 1:  # the run's sums: every process's chunks
            k = self.abs_sum.shape[0]
            if self.gram is None:  # none of the search chunks is this process's
                self.gram = torch.zeros(k, k, dtype=torch.float32, device=self.abs_sum.device)
            # clones: the sums were made in inference mode, which forbids updating them in place here
            self.abs_sum = distributed.all_reduce_sum(self.abs_sum.clone())
            self.gram = distributed.all_reduce_sum(self.gram.clone())
            self.num_tokens = distributed.sum_counts(self.num_tokens)
            self.search_tokens = distributed.sum_counts(self.search_tokens)
        assert self.gram is not None
        # clone outside inference mode: these feed parameter updates later
        mean_abs = (self.abs_sum / max(self.num_tokens, 1)).float().cpu().clone()
        return InputStats(mean_abs, regularised_gram(self.gram.clone(), self.search_tokens), self.num_tokens,
                          self.search_tokens)


RIDGE = 0.01


def regularised_gram(gram: torch.Tensor, num_tokens: int, ridge: float = RIDGE) -> torch.Tensor:
    """``X^T X`` made positive definite when it cannot be: fewer tokens than channels.

    With ``num_tokens < k`` the Gram matrix has rank at most ``num_tokens``, so an error
    in its null space costs nothing and the searches would accept it. Then
    ``ridge * mean(diag(X^T X)) * I`` is added: an unseen direction costs ``ridge`` times
    an average channel's energy. With enough tokens the matrix is returned unchanged (the
    default ``--awq-search-tokens`` is 2 k, see ``qtool.config.resolve_awq_search_tokens``).

    Args:
        gram: float32 ``[k, k]``.
        num_tokens: the tokens summed into ``gram``.
    """
    k = gram.shape[0]
    if num_tokens >= k:
        return gram
    lam = ridge * float(gram.diagonal().mean())
    return gram + lam * torch.eye(k, dtype=gram.dtype, device=gram.device)


@dataclass
class ModuleCalls:
    """The arguments a module was called with, one entry per search chunk."""

    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)

    def replay(self, module: nn.Module) -> list[torch.Tensor]:
        """Run ``module`` on every recorded call; the primary output of each (float,
        the shape of the module's output, e.g. ``[b, seqlen, h]``)."""
        outs = []
        with torch.inference_mode():
            for args, kwargs in zip(self.args, self.kwargs):
                out = module(*args, **kwargs)
                outs.append(out[0] if isinstance(out, tuple) else out)
        return outs


def search_chunk_count(chunk_tokens: Sequence[int], search_tokens: int) -> int:
    """How many leading calibration chunks hold at least ``search_tokens`` tokens."""
    total = 0
    for i, n in enumerate(chunk_tokens):
        total += n
        if total >= search_tokens:
            return i + 1
    return len(chunk_tokens)


def collect_block_stats(
    run: Callable[..., object],
    block: nn.Module,
    sources: Sequence[str],
    modules: Sequence[str],
    search_chunks: int,
) -> tuple[dict[str, InputStats], dict[str, ModuleCalls]]:
    """One float pass over the block's calibration chunks.

    Args:
        run: ``BlockContext.run``: runs the block over every chunk with forward hooks
            ``{name: fn(x, y)}`` and stops each chunk once every hooked module ran.
        block: the block (hooks on ``modules`` are registered on it).
        sources: linears whose input is recorded (the first linear of each set sharing
            one input).
        modules: non-linear scored modules whose call arguments are recorded.
        search_chunks: leading chunks that form the search subsample.

    Returns:
        ``({source: InputStats}, {module: ModuleCalls})``.
    """
    accs = {name: _InputAccumulator(search_chunks) for name in sources}
    calls = {name: ModuleCalls() for name in modules}

    def make_pre_hook(rec: ModuleCalls):
        def pre_hook(module, args, kwargs):
            if len(rec.args) < search_chunks:
                rec.args.append(args)
                rec.kwargs.append(dict(kwargs))

        return pre_hook

    # pre-hooks fire before the module's linears run, hence before the pass stops early
    handles = [block.get_submodule(name).register_forward_pre_hook(make_pre_hook(calls[name]), with_kwargs=True)
               for name in modules]

    def make_hook(acc: _InputAccumulator):
        return lambda x, y: acc.add(x)

    try:
        run(hooks={name: make_hook(accs[name]) for name in sources})
    finally:
        for h in handles:
            h.remove()
    return {name: acc.result() for name, acc in accs.items()}, calls
