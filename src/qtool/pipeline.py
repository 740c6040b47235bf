"""The block-by-block loop: capture block-0 inputs (and every block's own call
arguments), let the method quantize each block from its captured inputs, write the
dequantized weights back, re-run the block to produce the next block's inputs, move on.

Model weights stay on CPU; one block at a time visits the compute device. Calibration
activations live as ``[batch, seqlen, hidden]`` chunks so no step holds more than one
chunk's intermediate tensors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn as nn

from qtool.activations import Chunks, Store
from qtool.config import QuantizeConfig
from qtool.errors import NumericsError, QtoolError
from qtool.models import ArchSpec, get_blocks
from qtool.qtensor import QuantizedWeight

log = logging.getLogger(__name__)

Progress = Callable[..., None]


def _no_progress(event: str, **info: Any) -> None:
    pass


@dataclass
class LayerResult:
    """What a method returns for one linear: the quantized form and numbers to report."""

    qweight: QuantizedWeight | None  # None once committed to the work folder (stats only)
    stats: dict = field(default_factory=dict)


class _StopForward(Exception):
    """Raised from a hook once every module a pass needs has run."""


class _Catcher:
    """Stands in for one block's ``forward`` during capture: records the keyword arguments
    of every call (and, for block 0, the hidden states) and passes the hidden states on
    unchanged; the last block's stops the model's forward before the final norm and head."""

    def __init__(self, hidden: Chunks | None, last: bool, dtype: torch.dtype):
        self.hidden, self.last, self.dtype = hidden, last, dtype
        self.kwargs: list[dict] = []

    def __call__(self, hidden_states, *args, **kwargs):
        assert not args, "decoder blocks are called with keyword arguments"
        if self.hidden is not None:
            self.hidden.append(hidden_states.detach().to(self.dtype))
        self.kwargs.append(kwargs)
        if self.last:
            raise _StopForward
        return hidden_states


def _to(obj, device, dtype=None, copy: bool = False):
    """``obj`` (a tensor, or tuples, lists and dicts of them) on ``device``, floating
    tensors in ``dtype`` when given; ``copy``: new tensors even where nothing moves (out
    of inference mode, so that autograd may save them)."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype, copy=copy)
        return obj.to(device, copy=copy)
    if isinstance(obj, tuple):
        return tuple(_to(o, device, dtype, copy) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, dtype, copy) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype, copy) for k, v in obj.items()}
    return obj


def swap_submodule(block: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` where submodule ``name`` of ``block`` is; returns the one it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


@dataclass
class BlockInputs:
    """Captured inputs of the current block: ``hidden[i]`` float ``[b, seqlen, h]`` and
    the keyword arguments the model passed with it (masks, positions, rotary tables).

    ``block_kwargs[j][i]``: the keyword arguments the model gives block ``j`` with chunk
    ``i`` (blocks differ: sliding-window vs global masks, local vs global rotary tables);
    None means ``kwargs`` serve every block."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]
    block_kwargs: list[list[dict]] | None = None

    @property
    def num_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    def at_block(self, index: int, hidden: list[torch.Tensor]) -> BlockInputs:
        """The inputs of block ``index``: ``hidden`` with that block's own keyword arguments."""
        if self.block_kwargs is None:
            return BlockInputs(hidden, self.kwargs)
        return BlockInputs(hidden, self.block_kwargs[index], self.block_kwargs)


def capture_inputs(model: nn.Module, spec: ArchSpec, input_ids: torch.Tensor | list[dict], batch_size: int,
                   device: torch.device, dtype: torch.dtype, store: Store | None = None) -> BlockInputs:
    """Run the model's forward on every calibration chunk with each block's computation
    skipped (its hidden states pass through), keeping block 0's inputs and every block's
    keyword arguments. Those arguments depend only on the token positions, never on the
    hidden states, so they are what the real forward gives each block. Blocks of one
    kind receive the same objects, which are stored once.

    ``input_ids``: int64 ``[n, seqlen]`` token windows (``batch_size`` per chunk), or a
    list of image-text samples, each the processor's model inputs and one chunk of its
    own length (``qtool.calib_vlm``); their language blocks get the real multimodal
    positions (Qwen2-VL's 3-D mrope) and image-token hidden states.

    ``store`` (``qtool.activations``) keeps the hidden states (default: CPU memory)."""
    store = Store("cpu", torch.device("cpu")) if store is None else store
    blocks = get_blocks(model, spec)
    catchers = [_Catcher(store.new() if i == 0 else None, i == len(blocks) - 1, dtype) for i in range(len(blocks))]
    shadowed = [block.__dict__.get("forward") for block in blocks]
    moved = [m for m in (model.get_input_embeddings(), getattr(model.get_submodule(spec.blocks.rpartition(".")[0]), "rotary_emb", None)) if m is not None]
    try:
        for block, catcher in zip(blocks, catchers):
            block.forward = catcher  # an instance attribute: nn.Module.__call__ runs it instead
        if isinstance(input_ids, list):  # image-text samples: the vision tower runs too
            moved += [model.get_submodule(m) for m in spec.float_modules]
        for m in moved:
            m.to(device)
        with torch.inference_mode():
            for batch in _model_inputs(input_ids, batch_size, device):
                try:
                    model(**batch, use_cache=False)
                except _StopForward:
                    pass
    finally:
        for block, forward in zip(blocks, shadowed):
            if forward is None:
                del block.forward
            else:
                block.forward = forward
        for m in moved:
            m.to("cpu")
    hidden = catchers[0].hidden
    on_cpu: dict[int, dict] = {}
    per_chunk = [_dedupe([c.kwargs[i] for c in catchers]) for i in range(len(hidden))]  # [chunk][block]
    block_kwargs = [[on_cpu.setdefault(id(kw), _to(kw, "cpu")) for kw in chunk] for chunk in per_chunk]
    block_kwargs = [list(per_block) for per_block in zip(*block_kwargs)]  # [block][chunk]
    return BlockInputs(hidden, block_kwargs[0], block_kwargs)


def _model_inputs(input_ids, batch_size: int, device: torch.device):
    """The model's forward arguments per calibration chunk: ``batch_size`` rows of an
    int64 ``[n, seqlen]`` tensor, or each dict of a list as one chunk (an image-text
    sample from the model's processor: ``input_ids``, ``pixel_values``, ...)."""
    if isinstance(input_ids, list):
        for sample in input_ids:
            yield _to(sample, device)
        return
    for start in range(0, input_ids.shape[0], batch_size):
        yield {"input_ids": input_ids[start : start + batch_size].to(device)}


def _dedupe(calls: list[dict]) -> list[dict]:
    """``calls`` with each dict replaced by the first equal one (same keys, the same
    objects), so blocks of one kind share one stored copy."""
    unique: list[dict] = []
    out = []
    for kw in calls:
        same = next((u for u in unique if u.keys() == kw.keys() and all(_same(u[k], kw[k]) for k in kw)), None)
        if same is None:
            unique.append(kw)
        out.append(kw if same is None else same)
    return out


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, (tuple, list)) and type(a) is type(b) and len(a) == len(b):
        return all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and isinstance(a, (bool, int, float, str)) and a == b


class BlockContext:
    """What a method sees of one block: the block (on the compute device, in the compute
    dtype), its captured inputs and helpers to run it with hooks."""

    def __init__(self, block: nn.Module, index: int, spec: ArchSpec, config: QuantizeConfig,
                 inputs: BlockInputs | None, device: torch.device, dtype: torch.dtype, prefix: str,
                 store: Store | None = None):
        self.block, self.index, self.spec, self.config = block, index, spec, config
        self.inputs, self.device, self.dtype, self.prefix = inputs, device, dtype, prefix
        # where per-chunk activations live (qtool.activations): methods keep their caches in store.new()
        self.store = Store("device", device) if store is None else store
        # a method that already computed the block's quantized outputs (one chunk each,
        # on CPU) leaves them here and the pipeline skips its own forward
        self.outputs: Sequence[torch.Tensor] | None = None
        # linears the user excluded (--exclude): write_back leaves them in float
        self.keep_float: set[str] = set()

    def linear(self, name: str) -> nn.Linear:
        return self.block.get_submodule(name)

    def full_name(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def run(self, hooks: dict[str, Callable[[torch.Tensor, torch.Tensor], None]] | None = None,
            collect_outputs: bool = False, block: nn.Module | None = None) -> Chunks | None:
        """Run ``block`` (default: this block) over every captured chunk.

        ``hooks[name](x, y)`` is called with the input and output of submodule ``name``
        (relative to the block) for each chunk. Without ``collect_outputs`` the forward
        stops as soon as every hooked module has run, so collecting the inputs of early
        linears costs only the part of the block before them."""
        assert self.inputs is not None, "this method needs calibration inputs"
        block = self.block if block is None else block
        hooks = hooks or {}
        seen: set[str] = set()

        def make_hook(name, fn):
            def hook(module, args, output):
                fn(args[0], output)
                seen.add(name)
                if not collect_outputs and len(seen) == len(hooks):
                    raise _StopForward

            return hook

        handles = [block.get_submodule(n).register_forward_hook(make_hook(n, f)) for n, f in hooks.items()]
        outputs = self.store.new() if collect_outputs else None
        try:
            with torch.inference_mode():
                for hidden, kwargs in zip(self.inputs.hidden, self.inputs.kwargs):
                    seen.clear()
                    try:
                        out = block(_to(hidden, self.device), **_to(kwargs, self.device, self.dtype))
                    except _StopForward:
                        continue
                    if collect_outputs:
                        out = out[0] if isinstance(out, tuple) else out
                        outputs.append(out)
        finally:
            for h in handles:
                h.remove()
        return outputs

    def collect_inputs(self, fns: dict[str, Callable[[torch.Tensor], None]], block: nn.Module | None = None) -> None:
        """Call ``fns[name](x)`` with the input of submodule ``name`` for every chunk,
        stopping each chunk's forward *before* the last of them computes anything."""
        block = self.block if block is None else block
        seen: set[str] = set()

        def make_hook(name, fn):
            def hook(module, args):
                fn(args[0])
                seen.add(name)
                if len(seen) == len(fns):
                    raise _StopForward

            return hook

        handles = [block.get_submodule(n).register_forward_pre_hook(make_hook(n, f)) for n, f in fns.items()]
        try:
            with torch.inference_mode():
                for hidden, kwargs in zip(self.inputs.hidden, self.inputs.kwargs):
                    seen.clear()
                    try:
                        block(_to(hidden, self.device), **_to(kwargs, self.device, self.dtype))
                    except _StopForward:
                        pass
        finally:
            for h in handles:
                h.remove()

    def write_back(self, name: str, qweight: QuantizedWeight) -> None:
        """Replace the float weight of linear ``name`` by the dequantized quantized one
        (a no-op for ``keep_float`` linears: later linears see them in float, as saved)."""
        if name in self.keep_float:
            return
        lin = self.linear(name)
        lin.weight.data = qweight.dequantize(torch.float32).to(lin.weight.device, lin.weight.dtype)


class Method(Protocol):
    """A quantization method: quantizes every linear of one block."""

    name: str
    needs_calibration: bool

    def quantize_block(self, ctx: BlockContext) -> dict[str, LayerResult]: ...


def check_finite(name: str, tensor: torch.Tensor, what: str = "weights") -> None:
    if not torch.isfinite(tensor).all():
        raise NumericsError(f"{name} has NaN or inf {what}: the model is corrupt or overflowed; check the source weights")


def quantize_model(model: nn.Module, spec: ArchSpec, method: Method, config: QuantizeConfig,
                   input_ids: torch.Tensor | None, device: torch.device,
                   progress: Progress = _no_progress, start_block: int = 0,
                   on_block_done: Callable[[int, nn.Module, str, dict, list | None], None] | None = None,
                   inputs: BlockInputs | None = None,
                   should_stop: Callable[[], bool] = lambda: False,
                   keep_float: frozenset[str] = frozenset(), weights=None,
                   keep_qweights: bool = True, store: Store | None = None) -> dict[str, LayerResult]:
    """Quantize every block of ``model`` in place (weights are replaced by their
    dequantized quantized values) and return the results by full module name.
    Linears named in ``keep_float`` (full names, ``--exclude``) stay in float (with any
    AWQ scale folded in, which keeps the function) and get no result.

    ``start_block``/``inputs`` resume from a saved state (``inputs`` then holds the
    inputs of block ``start_block``); ``on_block_done(i, block, prefix, results,
    next_hidden)`` is called after each block (the resume checkpoint hook), and
    ``should_stop()`` is asked after it: True raises ``Interrupted``.

    ``weights`` (``qtool.streaming``) loads each block's parameters before it is worked on
    and releases them after ``on_block_done`` (default: the model is loaded whole);
    without ``keep_qweights`` the results keep their stats only (the quantized layers
    were committed by ``on_block_done``), so nothing of a finished block stays in memory.
    ``store`` (``qtool.activations``): where the activations live (default: CPU memory)."""
    from qtool.streaming import InMemory, trim_memory

    weights = InMemory() if weights is None else weights
    blocks = get_blocks(model, spec)
    compute_dtype = torch.float32 if device.type == "cpu" else _model_dtype(model)
    store = Store("cpu", device) if store is None else store
    if method.needs_calibration and inputs is None:
        assert input_ids is not None and start_block == 0
        progress("capture", total=len(input_ids))
        inputs = capture_inputs(model, spec, input_ids, config.batch_size, device, compute_dtype, store)
    results: dict[str, LayerResult] = {}
    progress("blocks", total=len(blocks), start=start_block)
    for i in range(start_block, len(blocks)):
        t0 = time.perf_counter()
        block = blocks[i]
        prefix = f"{spec.blocks}.{i}"
        weights.load(block, prefix)
        block_spec = spec.for_block(i)  # blocks may differ (DeepSeek: dense and MoE)
        for name in block_spec.linears:
            check_finite(f"{prefix}.{name}", block.get_submodule(name).weight)
        original_dtype = next(block.parameters()).dtype
        block.to(device=device, dtype=compute_dtype)
        ctx = BlockContext(block, i, block_spec, config, inputs, device, compute_dtype, prefix, store)
        ctx.keep_float = {n for n in block_spec.linears if f"{prefix}.{n}" in keep_float}
        block_results = {n: r for n, r in method.quantize_block(ctx).items() if n not in ctx.keep_float}
        for name, res in block_results.items():
            ctx.write_back(name, res.qweight)
        if inputs is not None and i + 1 < len(blocks):
            outputs = ctx.outputs if ctx.outputs is not None else ctx.run(collect_outputs=True)
            inputs = inputs.at_block(i + 1, outputs)
            for h in inputs.hidden:
                check_finite(f"{prefix} output", h, "activations")
        block.to(device="cpu", dtype=original_dtype)
        named = {f"{prefix}.{n}": r for n, r in block_results.items()}
        results.update(named)
        if on_block_done is not None:
            on_block_done(i, block, prefix, named, inputs.hidden if inputs is not None and i + 1 < len(blocks) else None)
        weights.release(block)
        if not keep_qweights:
            results.update({n: LayerResult(None, r.stats) for n, r in named.items()})
            trim_memory()  # the finished block's memory goes back to the OS: the peak does not grow with depth
        progress("block", index=i, total=len(blocks), seconds=time.perf_counter() - t0,
                 layers={n: r.stats for n, r in named.items()})
        if should_stop() and i + 1 < len(blocks):
            raise Interrupted(f"interrupted after block {i + 1}/{len(blocks)}; progress is saved: rerun the same "
                              "command with --resume to continue")
    return results


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating parameters (a streamed skeleton's are on meta but typed)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


class Interrupted(QtoolError):
    """The user stopped the run (SIGINT/SIGTERM) at a block boundary; work was saved."""

    exit_code = 130
