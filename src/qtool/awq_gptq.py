"""AWQ+GPTQ (``--method awq-gptq``): per block, AWQ's scale search and folds, then GPTQ.

The AWQ paper notes that its scales are orthogonal to GPTQ and that the two combine;
here, per block:

1. ``AWQMethod.prepare_block``: the float statistics pass, the scale search per scaling
   group with its fold into the block (exact in float, each fold proven on the real model
   by ``qtool.awq.prove`` before calibration, as for ``--method awq``), and, with
   ``--awq-clip``, the clip search on the scaled weights;
2. the clip bounds are applied by clamping the scaled weights (llm-awq's ``apply_clip``);
3. ``GPTQMethod.quantize_block`` on the folded block: its Hessians are accumulated from the
   block run with the folds in, i.e. from the scaled inputs ``x / s`` of the scaled weights
   ``W s``, true-sequential as for ``--method gptq``.

AWQ's searches score their candidates with RTN, as for ``--method awq`` (the searches are
AWQ's, unchanged); GPTQ then does better than RTN on whatever scales they chose. The
block's output for the next block comes out of step 3, so each block costs AWQ's passes
plus GPTQ's. Everything GPTQ supports (act-order, static groups, ``--scale-search
mse``, every output format) applies; AWQ's ``--awq-*`` options choose the search.
Each layer's stats are GPTQ's plus AWQ's ``alpha`` and ``scale_err_ratio``; both relative
errors are measured in the scaled space, against the (clipped) weight GPTQ quantized.
"""

from __future__ import annotations

from qtool.awq.apply import clamp_to_clip
from qtool.awq.method import AWQMethod
from qtool.config import AWQ_MIN_SEARCH_TOKENS
from qtool.gptq.method import GPTQMethod
from qtool.pipeline import BlockContext, LayerResult


class AWQGPTQMethod:
    """AWQ's scales (and clip bounds), then GPTQ.

    Args:
        search_tokens: AWQ's search subsample (``--awq-search-tokens``).
    """

    name = "awq-gptq"
    needs_calibration = True

    def __init__(self, search_tokens: int = AWQ_MIN_SEARCH_TOKENS):
        self.awq = AWQMethod(search_tokens=search_tokens)
        self.gptq = GPTQMethod()

    def quantize_block(self, ctx: BlockContext) -> dict[str, LayerResult]:
        plan = self.awq.prepare_block(ctx)
        for name, bound in plan.clip_max.items():
            clamp_to_clip(ctx.linear(name), bound, ctx.config.group_size)
        out = self.gptq.quantize_block(ctx)
        for name, res in out.items():
            awq = plan.layer_stats.get(name, {})
            res.stats.update({k: v for k, v in awq.items() if k != "seconds"})
            res.stats["seconds"] = round(res.stats.get("seconds", 0.0) + awq.get("seconds", 0.0), 3)
        return out
