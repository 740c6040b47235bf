"""AWQ as a pipeline method. Per block:

1. one float pass over the calibration chunks records, for every linear input, the mean
   |x| per channel (all tokens) and ``X^T X`` (search subsample), and the call arguments
   of the scored attention/MLP modules (search subsample);
2. per scaling group in execution order: search the scales, fold them into the block;
3. per linear (except queries and keys): search the clip bounds on the scaled weights;
4. RTN-quantize every linear with its clip bounds.

Search subsample: the leading calibration chunks holding at least ``search_tokens``
tokens (``--awq-search-tokens``; auto = max(4096, 2 x the largest in_features), so the
Gram matrices are full rank; 4096 = 8 sequences of 512 for models up to k = 2048). Whole
sequences are kept because attention needs them. Scale folding is exact in float, so statistics gathered once before any
folding stay valid for every group: a group's fold only rescales its own linears' input,
which the method tracks (``H -> H / (s s^T)``) for the clip search.

Several processes (``qtool.distributed``): each runs its own chunks; the statistics and
the module-scored search losses are summed over the processes, so all pick the same
scales; the clip search of linear ``j`` runs on rank ``j mod N`` and its bounds are shared.

With ``load_search`` the searches are skipped: the given scales and clip bounds are
applied as they are, which needs no calibration data and reproduces the searched
checkpoint exactly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from qtool import distributed
from qtool.awq.apply import fold_scales
from qtool.awq.auto_clip import search_clip
from qtool.awq.auto_scale import search_linear_scale, search_module_scale
from qtool.awq.search_io import empty_search, search_from_json, search_to_json
from qtool.awq.stats import collect_block_stats, search_chunk_count
from qtool.config import AWQ_MIN_SEARCH_TOKENS
from qtool.errors import NumericsError, UserInputError
from qtool.layer_error import OUTPUT_KEY, WEIGHT_KEY, layer_errors
from qtool.models.base import ScaleGroup
from qtool.pipeline import BlockContext, LayerResult
from qtool.rtn import rtn_quantize

log = logging.getLogger(__name__)

CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5


class AWQMethod:
    """AWQ: activation-aware scales, clip search, then RTN.

    Args:
        load_search: results of an earlier search (``qtool.awq.search_io.load_search``)
            to apply instead of searching; then no calibration data is needed.
        search_tokens: size of the search subsample (tokens, rounded up to whole chunks).

    Attributes:
        search_results: the scales, clip bounds and alphas applied so far, in the
            ``search_io`` layout (ready for ``save_search``).
    """

    name = "awq"

    def __init__(self, load_search: dict | None = None, search_tokens: int = AWQ_MIN_SEARCH_TOKENS,
                 clip_grid: int = CLIP_GRID, clip_max_shrink: float = CLIP_MAX_SHRINK):
        self.load_search = load_search
        self.needs_calibration = load_search is None
        self.search_tokens = search_tokens
        self.clip_grid, self.clip_max_shrink = clip_grid, clip_max_shrink
        self.search_results = empty_search()

    def block_state(self, prefix: str) -> dict:
        """The search results of block ``prefix`` as JSON data (saved with the block by
        resumable runs)."""
        return search_to_json(self.search_results, prefix)

    def restore(self, states: dict[int, dict]) -> None:
        """Take back the search results of blocks finished by an interrupted run."""
        for state in states.values():
            part = search_from_json(state)
            for kind in ("scales", "clip_max", "alpha"):
                self.search_results[kind].update(part[kind])

    def quantize_block(self, ctx: BlockContext) -> dict[str, LayerResult]:
        plan = self.prepare_block(ctx)
        cfg = ctx.config
        out: dict[str, LayerResult] = {}
        for name in ctx.spec.linears:
            lin = ctx.linear(name)
            bound = plan.clip_max.get(name)
            qw = rtn_quantize(lin.weight, cfg.bits_for(ctx.full_name(name)), cfg.group_size, cfg.symmetric,
                              None if lin.bias is None else lin.bias.detach().to("cpu"),
                              None if bound is None else bound.to(lin.weight.device))
            info = dict(plan.layer_stats.get(name, {}))
            # both errors are measured in the scaled space (W s, x / s), where AWQ quantizes
            deq = qw.dequantize().to(lin.weight.device)
            info.update(layer_errors(lin.weight, deq, None if plan.grams is None else plan.grams[name]))
            # the squared ratios under their first names, kept for older readers of qtool.json
            info["weight_rel_err"] = (info[WEIGHT_KEY] / 100) ** 2
            if OUTPUT_KEY in info:
                info["out_rel_err"] = (info[OUTPUT_KEY] / 100) ** 2
            out[name] = LayerResult(qw, info)
        return out

    def prepare_block(self, ctx: BlockContext) -> BlockPlan:
        """Steps 1-3 of the module docstring (or the loaded search): the block's scales are
        folded into it in place (its float function unchanged); returns what quantizing its
        linears needs. ``qtool.awq_gptq`` runs GPTQ on the folded block instead of RTN."""
        groups = [g for g in ctx.spec.scale_groups if g.applies_to(ctx.block)]
        return self._search(ctx, groups) if self.load_search is None else self._apply_loaded(ctx, groups)

    def _search(self, ctx: BlockContext, groups: list[ScaleGroup]) -> BlockPlan:
        """Statistics pass, scale search and fold per group, clip search per linear."""
        cfg = ctx.config
        source_of = _source_of(ctx)
        assert ctx.inputs is not None
        # the run's leading chunks (with several processes, spread over them: qtool.distributed)
        tokens = distributed.all_chunks([h.shape[0] * h.shape[1] for h in ctx.inputs.hidden])
        n_search = distributed.local_prefix(search_chunk_count(tokens, self.search_tokens))
        input_stats, calls = collect_block_stats(ctx.run, ctx.block, [seq[0] for seq in ctx.spec.sequential],
                                                 [g.module for g in groups if not _scores_single_linear(g)], n_search)
        for src, st in input_stats.items():
            if not (torch.isfinite(st.mean_abs).all() and torch.isfinite(st.gram).all()):
                raise NumericsError(f"{ctx.full_name(src)} has NaN or inf input activations: "
                                    "the model overflowed in this dtype; try --dtype float32")
        # Gram of each source's *current* input: a fold turns x into x / s
        grams = {src: st.gram for src, st in input_stats.items()}
        layer_stats: dict[str, dict] = {}
        for group in groups:
            t0 = time.perf_counter()
            key = ctx.full_name(group.prev)
            src = source_of[group.linears[0]]
            assert all(source_of[n] == src for n in group.linears), group
            st = input_stats[src]
            linears = [ctx.linear(n) for n in group.linears]
            # --bits-budget gives the linears of a group one width (qtool.budget): search at it
            bits = cfg.bits_for(ctx.full_name(group.linears[0]))
            if _scores_single_linear(group):
                res = search_linear_scale(linears[0].weight, st.gram, st.search_tokens, st.mean_abs, bits,
                                          cfg.group_size, cfg.symmetric, cfg.awq_grid, key)
            else:
                res = search_module_scale(ctx.block.get_submodule(group.module), linears, calls[group.module],
                                          st.mean_abs, bits, cfg.group_size, cfg.symmetric, cfg.awq_grid, key)
            fold_scales(ctx.block.get_submodule(group.prev), linears, res.scales, key, kind=group.kind,
                        rows=group.rows(ctx.block))
            s = res.scales.to(st.gram.device)
            grams[src] = st.gram / (s[:, None] * s[None, :])
            self.search_results["scales"][key] = res.scales.cpu()
            self.search_results["alpha"][key] = res.alpha
            seconds = time.perf_counter() - t0
            ratio = res.loss / res.loss_unscaled if res.loss_unscaled > 0 else 1.0
            log.debug("%s: alpha=%.2f, output error x%.3f of unscaled, %.2fs", key, res.alpha, ratio, seconds)
            for n in group.linears:
                layer_stats[n] = {"alpha": res.alpha, "scale_err_ratio": ratio, "seconds": seconds}
        clip_max: dict[str, torch.Tensor] = {}
        if cfg.awq_clip:
            clipped = [(j, name) for j, name in enumerate(ctx.spec.linears) if name not in ctx.spec.no_clip]
            searched: dict[str, tuple[torch.Tensor, float]] = {}
            for j, name in clipped:  # linear j on rank j mod N, then shared (all here in one process)
                if distributed.owns(j):
                    t0 = time.perf_counter()
                    bound = search_clip(ctx.linear(name).weight, grams[source_of[name]],
                                        cfg.bits_for(ctx.full_name(name)), cfg.group_size,
                                        cfg.symmetric, self.clip_grid, self.clip_max_shrink).cpu()
                    searched[name] = (bound, time.perf_counter() - t0)
            for j, name in clipped:
                clip_max[name], seconds = distributed.broadcast(searched.get(name), distributed.owner(j))
                self.search_results["clip_max"][ctx.full_name(name)] = clip_max[name]
                entry = layer_stats.setdefault(name, {"seconds": 0.0})
                entry["seconds"] += seconds
        for entry in layer_stats.values():
            entry["seconds"] = round(entry["seconds"], 3)
        return BlockPlan(clip_max, layer_stats, {name: grams[src] for name, src in source_of.items()})

    def _apply_loaded(self, ctx: BlockContext, groups: list[ScaleGroup]) -> BlockPlan:
        """Fold the loaded scales and take the loaded clip bounds, checking their shapes."""
        loaded = self.load_search
        assert loaded is not None
        layer_stats: dict[str, dict] = {}
        for group in groups:
            key = ctx.full_name(group.prev)
            scales = loaded["scales"].get(key)
            linears = [ctx.linear(n) for n in group.linears]
            if scales is None or scales.shape != (linears[0].in_features,):
                raise UserInputError(f"the AWQ search file has no scales of length {linears[0].in_features} for {key}: "
                                     "it was saved for another model; search again without --load-search")
            fold_scales(ctx.block.get_submodule(group.prev), linears, scales, key, kind=group.kind,
                        rows=group.rows(ctx.block))
            self.search_results["scales"][key] = scales
            alpha = loaded.get("alpha", {}).get(key)
            if alpha is not None:
                self.search_results["alpha"][key] = alpha
                for n in group.linears:
                    layer_stats[n] = {"alpha": alpha}
        clip_max: dict[str, torch.Tensor] = {}
        for name in ctx.spec.linears:
            bound = loaded["clip_max"].get(ctx.full_name(name))
            if bound is None:
                continue
            lin = ctx.linear(name)
            g = lin.in_features if ctx.config.group_size == -1 else ctx.config.group_size
            if bound.shape != (lin.out_features, lin.in_features // g):
                raise UserInputError(f"the AWQ search file's clip bounds for {ctx.full_name(name)} have shape "
                                     f"{tuple(bound.shape)}, not {(lin.out_features, lin.in_features // g)}: it was "
                                     "saved for another model or group size; search again without --load-search")
            clip_max[name] = bound
            self.search_results["clip_max"][ctx.full_name(name)] = bound
        return BlockPlan(clip_max, layer_stats, None)


@dataclass
class BlockPlan:
    """What quantizing one block's linears needs after the search (or the load).

    Attributes:
        clip_max: linear name -> float32 ``[n, G]`` clip bounds (absent: no clip).
        layer_stats: linear name -> numbers to report.
        grams: linear name -> ``X^T X`` of its scaled input on the search tokens (for
            the output error report), or None without calibration.
    """

    clip_max: dict[str, torch.Tensor]
    layer_stats: dict[str, dict]
    grams: dict[str, torch.Tensor] | None


def _source_of(ctx: BlockContext) -> dict[str, str]:
    """Each linear -> the first linear of its execution group (they share one input)."""
    return {name: seq[0] for seq in ctx.spec.sequential for name in seq}


def _scores_single_linear(group: ScaleGroup) -> bool:
    return group.linears == (group.module,)
