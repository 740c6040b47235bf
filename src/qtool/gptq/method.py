"""GPTQ as a pipeline method: per block, accumulate each linear's Hessian from its
calibration inputs and solve, group by group in execution order (true-sequential), so
later linears see inputs produced by the already-quantized earlier ones.

When the architecture file declares the attention/MLP structure, the stages replay cached
intermediate tensors (the o_proj input, the attention output, the MLP input, the
down_proj input) instead of re-running the block from its input for every stage: the
whole block then costs about one forward pass plus the Hessians, and the block's output
for the next block comes out of the last stage for free. The result is identical to the
re-running path (same tensors, same order of operations).

Several processes (``qtool.distributed``): each collects Hessians from its own chunks and
they are summed before any solve; linear ``j`` of the block is solved on rank ``j mod N``
and its result broadcast (``_share``), so every process writes back the same weights.

Mixture-of-experts blocks (``qtool.models.moe``): every routed expert has its own Hessians,
from the tokens the router sends it (all experts' gate/up in one pass, then all downs);
its token count and the policy it got (``calibrated``, or ``--moe-low-tokens`` under
``--moe-min-tokens``) are recorded with its layers' stats.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch
import torch.nn as nn

from qtool import distributed
from qtool.gptq.hessian import HessianAccumulator
from qtool.gptq.solver import gptq_quantize
from qtool.layer_error import layer_errors
from qtool.models.moe import expert_of, gptq_stages
from qtool.pipeline import BlockContext, LayerResult, _StopForward, swap_submodule
from qtool.rtn import config_ratios, rtn_quantize

log = logging.getLogger(__name__)


class _Replay(nn.Module):
    """Stands in for a submodule and returns its precomputed output for each chunk, in
    order (as a tuple with ``None`` attention weights when ``as_tuple``)."""

    def __init__(self, outputs: list[torch.Tensor], as_tuple: bool):
        super().__init__()
        self.outputs, self.as_tuple, self.calls = outputs, as_tuple, 0

    def forward(self, *args, **kwargs):
        out = self.outputs[self.calls]
        self.calls += 1
        return (out, None) if self.as_tuple else out


class GPTQMethod:
    name = "gptq"
    needs_calibration = True

    def quantize_block(self, ctx: BlockContext) -> dict[str, LayerResult]:
        self.out: dict[str, LayerResult] = {}
        self.pending: list[str] = []  # solved (here or on another rank), not yet shared and written back
        spec = ctx.spec
        if ctx.config.true_sequential and spec.attention and spec.mlp and len(spec.sequential) == 4:
            self._replayed_stages(ctx)
        else:
            self.expert_tokens: dict[int, int] = {}
            stages = gptq_stages(spec) if ctx.config.true_sequential else (spec.linears,)
            for stage in stages:
                hessians, low = self._stage_hessians(ctx, [g[0] for g in spec.sequential if g[0] in stage])
                for group in spec.sequential:
                    if group[0] not in hessians:
                        continue
                    expert = expert_of(spec, group[0])
                    if expert is None:
                        self._solve(ctx, group, hessians[group[0]])
                        continue
                    info = {"expert_tokens": self.expert_tokens[expert[0]],
                            "expert_policy": ctx.config.moe_low_tokens if group[0] in low else "calibrated"}
                    if info["expert_policy"] == "rtn":
                        self._round(ctx, group, info)
                    else:
                        self._solve(ctx, group, hessians[group[0]], info)
                self._share(ctx)
        return self.out

    # -- pieces -------------------------------------------------------------------------

    def _hessians(self, ctx: BlockContext, sources: list[str], counts: dict | None = None) -> dict[str, torch.Tensor]:
        """Hessians of the inputs of ``sources``; linears of one execution group (q/k/v,
        gate/up) read the same input, so one Hessian serves the whole group. ``counts``
        receives each source's number of input rows (tokens)."""
        accs = {s: HessianAccumulator(ctx.linear(s).in_features, ctx.full_name(s), device=ctx.device) for s in sources}
        ctx.collect_inputs({s: accs[s].add for s in sources})
        reduced = {s: _run_hessian(acc) for s, acc in accs.items()}
        if counts is not None:
            counts.update({s: n for s, (_, n) in reduced.items()})
        return {s: h for s, (h, _) in reduced.items()}

    def _stage_hessians(self, ctx: BlockContext, sources: list[str]) -> tuple[dict[str, torch.Tensor], set[str]]:
        """Hessians of ``sources`` and the routed-expert sources under ``--moe-min-tokens``.

        A routed expert's Hessian comes from the tokens the router sent it; its count is
        recorded (``expert_tokens``) on the first stage that sees it. Under the threshold,
        the ``all-experts`` policy collects that expert's inputs again with every
        calibration token run through it (``PerExpertLinears.observe_all``: statistics
        only, the block's output still follows the router); ``rtn`` leaves it to ``_round``.
        """
        spec, cfg = ctx.spec, ctx.config
        hessians = self._hessians(ctx, sources, counts := {})
        for source in sources:
            expert = expert_of(spec, source)
            if expert is not None:
                self.expert_tokens.setdefault(expert[0], counts[source])
        low = {s for s in sources if (e := expert_of(spec, s)) is not None and self.expert_tokens[e[0]] < cfg.moe_min_tokens}
        for source in sorted(low):
            e = expert_of(spec, source)[0]
            log.warning("%s: expert %d got %d calibration tokens (< --moe-min-tokens %d): %s", ctx.full_name(source),
                        e, self.expert_tokens[e], cfg.moe_min_tokens,
                        "statistics from all tokens" if cfg.moe_low_tokens == "all-experts" else "round-to-nearest")
        if low and cfg.moe_low_tokens == "all-experts":
            experts = ctx.block.get_submodule(spec.moe.experts)
            experts.observe_all = {expert_of(spec, s)[0] for s in low}
            try:
                hessians.update(self._hessians(ctx, sorted(low)))
            finally:
                experts.observe_all = set()
        return hessians, low

    def _round(self, ctx: BlockContext, group: tuple[str, ...], info: dict) -> None:
        """Round-to-nearest for linears without usable calibration statistics."""
        cfg = ctx.config
        for name in group:
            lin = ctx.linear(name)
            qw = rtn_quantize(lin.weight, cfg.bits_for(ctx.full_name(name)), cfg.group_size, cfg.symmetric, None if lin.bias is None else
                              lin.bias.detach().to("cpu"), ratios=config_ratios(cfg))
            errors = layer_errors(lin.weight, qw.dequantize().to(lin.weight.device))
            ctx.write_back(name, qw)
            self.out[name] = LayerResult(qw, {**errors, **info})

    def _solve(self, ctx: BlockContext, group: tuple[str, ...], hessian: torch.Tensor, info: dict | None = None) -> None:
        """Solve the linears of ``group`` this process owns (all in one process); ``_share``
        then gives every process every result and writes them back."""
        cfg = ctx.config
        for name in group:
            self.pending.append(name)
            if not distributed.owns(ctx.spec.linears.index(name)):
                continue
            lin = ctx.linear(name)
            t0 = time.perf_counter()
            res = gptq_quantize(lin.weight, hessian, bits=cfg.bits_for(ctx.full_name(name)), group_size=cfg.group_size, sym=cfg.symmetric,
                                act_order=cfg.act_order, static_groups=cfg.static_groups, block_size=cfg.block_size,
                                damp=cfg.damp, name=ctx.full_name(name), ratios=config_ratios(cfg))
            qw = res.qweight
            if lin.bias is not None:
                qw = replace(qw, bias=lin.bias.detach().to("cpu").clone())
            errors = layer_errors(lin.weight, qw.dequantize().to(lin.weight.device), hessian)  # before write-back
            self.out[name] = LayerResult(qw, {"loss": res.loss, "damp": res.damp_used, **errors, **(info or {}),
                                              "seconds": round(time.perf_counter() - t0, 3)})

    def _share(self, ctx: BlockContext) -> None:
        """Every process gets each pending result from the rank that solved it and writes
        it back (a group's linears are independent: deferring their write-backs changes
        nothing)."""
        for name in self.pending:
            res = distributed.broadcast(self.out.get(name), distributed.owner(ctx.spec.linears.index(name)))
            self.out[name] = res
            ctx.write_back(name, res.qweight)
        self.pending = []

    def _replayed_stages(self, ctx: BlockContext) -> None:
        spec, block, dev = ctx.spec, ctx.block, ctx.device
        qkv, (o_name,), up_group, (down_name,) = spec.sequential
        # 1. q/k/v: their input is the normed block input
        self._solve(ctx, qkv, self._hessians(ctx, [qkv[0]])[qkv[0]])
        self._share(ctx)
        # 2. o_proj: its input is the attention with quantized q/k/v
        o_inputs = ctx.store.new()  # per-chunk caches live where the activations live (qtool.activations)
        acc = HessianAccumulator(ctx.linear(o_name).in_features, ctx.full_name(o_name), device=dev)
        ctx.collect_inputs({o_name: lambda x: (acc.add(x), o_inputs.append(x.clone()))})
        self._solve(ctx, (o_name,), _run_hessian(acc)[0])
        self._share(ctx)
        # 3. gate/up: replay the attention as quantized o_proj(cached input)
        o_proj = ctx.linear(o_name)
        with torch.inference_mode():
            attn_out = ctx.store.new(o_proj(x) for x in o_inputs)
        o_inputs.clear()
        mlp_inputs = ctx.store.new()
        acc = HessianAccumulator(ctx.linear(up_group[0]).in_features, ctx.full_name(up_group[0]), device=dev)
        attention = swap_submodule(block, spec.attention, _Replay(attn_out, as_tuple=True))
        try:
            ctx.collect_inputs({spec.mlp: lambda x: (acc.add(x), mlp_inputs.append(x.clone()))})
        finally:
            swap_submodule(block, spec.attention, attention)
        self._solve(ctx, up_group, _run_hessian(acc)[0])
        self._share(ctx)
        # 4. down_proj: run only the MLP (with quantized gate/up) on the cached MLP input
        mlp = block.get_submodule(spec.mlp)
        down_inputs = ctx.store.new()
        acc = HessianAccumulator(ctx.linear(down_name).in_features, ctx.full_name(down_name), device=dev)

        def record(module, args):
            acc.add(args[0])
            down_inputs.append(args[0].clone())
            raise _StopForward  # down_proj itself is not quantized yet: skip computing it

        hook = ctx.linear(down_name).register_forward_pre_hook(record)
        try:
            with torch.inference_mode():
                for x in mlp_inputs:
                    try:
                        mlp(x)
                    except _StopForward:
                        pass
        finally:
            hook.remove()
        mlp_inputs.clear()
        self._solve(ctx, (down_name,), _run_hessian(acc)[0])
        self._share(ctx)
        # 5. the block's output: both halves replayed from the cached tensors
        down = ctx.linear(down_name)
        with torch.inference_mode():
            mlp_out = ctx.store.new(down(x) for x in down_inputs)
        down_inputs.clear()
        attention = swap_submodule(block, spec.attention, _Replay(attn_out, as_tuple=True))
        mlp = swap_submodule(block, spec.mlp, _Replay(mlp_out, as_tuple=False))
        try:
            ctx.outputs = ctx.run(collect_outputs=True)
        finally:
            swap_submodule(block, spec.attention, attention)
            swap_submodule(block, spec.mlp, mlp)


def _run_hessian(acc: HessianAccumulator) -> tuple[torch.Tensor, int]:
    """``(H, tokens)`` of the whole run: this process's Hessian, or with several processes
    their token-weighted mean (``qtool.distributed.mean_over_ranks``)."""
    return distributed.mean_over_ranks(acc.hessian, acc.nsamples)
