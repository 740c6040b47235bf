"""GPTQ as a pipeline method: per block, accumulate each linear's Hessian from its
calibration inputs and solve, group by group in execution order (true-sequential), so
later linears see inputs produced by the already-quantized earlier ones."""

from __future__ import annotations

import time

from qtool.gptq.hessian import HessianAccumulator
from qtool.gptq.solver import gptq_quantize
from qtool.pipeline import BlockContext, LayerResult


class GPTQMethod:
    name = "gptq"
    needs_calibration = True

    def quantize_block(self, ctx: BlockContext) -> dict[str, LayerResult]:
        cfg = ctx.config
        stages = ctx.spec.sequential if cfg.true_sequential else (ctx.spec.linears,)
        if not cfg.true_sequential:
            # one pass collects every input; linears that share an input share a Hessian
            stages = (tuple(name for group in ctx.spec.sequential for name in group),)
        out: dict[str, LayerResult] = {}
        for stage in stages:
            # linears of one execution group (q/k/v, gate/up) read the same input tensor
            sources = [group[0] for group in ctx.spec.sequential if group[0] in stage]
            accs = {src: HessianAccumulator(ctx.linear(src).in_features, ctx.full_name(src), device=ctx.device)
                    for src in sources}
            ctx.run(hooks={src: (lambda acc: lambda x, y: acc.add(x))(accs[src]) for src in sources})
            for group in ctx.spec.sequential:
                if group[0] not in accs:
                    continue
                hessian = accs[group[0]].hessian
                for name in group:
                    lin = ctx.linear(name)
                    t0 = time.perf_counter()
                    res = gptq_quantize(lin.weight, hessian, bits=cfg.bits, group_size=cfg.group_size,
                                        sym=cfg.symmetric, act_order=cfg.act_order, static_groups=cfg.static_groups,
                                        block_size=cfg.block_size, damp=cfg.damp, name=ctx.full_name(name))
                    qw = res.qweight
                    if lin.bias is not None:
                        from dataclasses import replace

                        qw = replace(qw, bias=lin.bias.detach().to("cpu").clone())
                    ctx.write_back(name, qw)
                    out[name] = LayerResult(qw, {"loss": res.loss, "damp": res.damp_used,
                                                 "seconds": round(time.perf_counter() - t0, 3)})
        return out
