"""The layout check: before calibration, every block of the real model runs once (a
float32 copy, on a short deterministic token sequence, with the arguments the model's
own forward gives that block) and the family file must describe what it does:

- every linear of ``sequential`` runs exactly once (a routed expert's at most once: the
  router may send it none of the probe tokens) and no other ``nn.Linear`` is in the
  block (except ``float_linears``): nothing is quantized twice or left in float silently;
- linears of one ``sequential`` tuple read the same input and the tuples run in order
  (what GPTQ's true-sequential stages and the hooks that stop a pass early rely on);
- ``attention`` and ``mlp`` return their last linear's output (what GPTQ's replayed
  stages rely on).

``probe_blocks`` yields each block with its real inputs and output, so the AWQ fold proof
(``qtool.awq.prove``) reuses the same pass.

Cost: one forward of the model over ``PROBE_TOKENS`` tokens to reach the first block
(stopped before the final norm and head), then per block a float32 copy and one traced
forward; for the 135M default model about 0.3 s on 2 CPU cores.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from qtool.errors import UnsupportedError
from qtool.models import get_blocks, is_registered, supported_model_types
from qtool.models.base import ArchSpec
from qtool.models.moe import expert_of

PROBE_TOKENS = 16
PROBE_SEED = 0


@dataclass
class BlockProbe:
    """One block on its real inputs.

    Attributes:
        index, prefix: position of the block (``model.layers.3``).
        block: a float32 copy of the block (the model's own block is never modified).
        args, kwargs: the call the model's forward makes, floats in float32
            (``args[0]``: hidden states ``[1, PROBE_TOKENS, h]``).
        output: float32 primary output of the block, ``[1, PROBE_TOKENS, h]``.
        calls: names (relative to the block) of the ``nn.Linear`` modules in call order,
            one entry per call.
        inputs, outputs: first-call input / primary output of each linear that ran, and
            the outputs of ``spec.attention`` / ``spec.mlp``.
    """

    index: int
    prefix: str
    block: nn.Module
    args: tuple
    kwargs: dict
    output: torch.Tensor
    calls: list[str]
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]

    def run(self) -> torch.Tensor:
        """The primary output of ``block`` (as it is now) on the recorded call."""
        with torch.inference_mode():
            return _primary(self.block(*self.args, **self.kwargs))


def probe_tokens(vocab_size: int, num_tokens: int = PROBE_TOKENS) -> torch.Tensor:
    """int64 ``[1, num_tokens]``: deterministic token ids (seeded, independent of the model)."""
    return torch.randint(0, vocab_size, (1, num_tokens), generator=torch.Generator().manual_seed(PROBE_SEED))


def probe_blocks(model: nn.Module, spec: ArchSpec, num_tokens: int = PROBE_TOKENS, weights=None) -> Iterator[BlockProbe]:
    """Yield a ``BlockProbe`` per block, in order; block ``i + 1`` reads block ``i``'s
    float32 output. Only one block copy is alive at a time; ``weights``
    (``qtool.streaming``) loads a streamed model's block for the time of its copy."""
    from qtool.streaming import InMemory

    weights = InMemory() if weights is None else weights
    from qtool.pipeline import _to, capture_inputs

    ids = probe_tokens(model.get_input_embeddings().num_embeddings, num_tokens)
    captured = capture_inputs(model, spec, ids, 1, torch.device("cpu"), torch.float32)
    assert captured.block_kwargs is not None
    hidden = captured.hidden[0]
    for i, block in enumerate(get_blocks(model, spec)):
        kwargs = _to(captured.block_kwargs[i][0], "cpu", torch.float32)
        with weights.loaded(block, f"{spec.blocks}.{i}"):
            twin = copy.deepcopy(block).float()
        probe = _trace(twin, i, f"{spec.blocks}.{i}", spec.for_block(i), (hidden,), kwargs)
        yield probe
        hidden = probe.output


def _trace(block: nn.Module, index: int, prefix: str, spec: ArchSpec, args: tuple, kwargs: dict) -> BlockProbe:
    calls: list[str] = []
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def pre_hook(name):
        def hook(module, hook_args):
            calls.append(name)
            inputs.setdefault(name, hook_args[0].detach())

        return hook

    def post_hook(name):
        def hook(module, hook_args, out):
            outputs.setdefault(name, _primary(out).detach())

        return hook

    handles = []
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear):
            handles += [module.register_forward_pre_hook(pre_hook(name)), module.register_forward_hook(post_hook(name))]
        elif name and name in (spec.attention, spec.mlp):
            handles.append(module.register_forward_hook(post_hook(name)))
    try:
        with torch.inference_mode():
            output = _primary(block(*args, **kwargs))
    finally:
        for h in handles:
            h.remove()
    return BlockProbe(index, prefix, block, args, kwargs, output, calls, inputs, outputs)


def _primary(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def check_execution(spec: ArchSpec, probe: BlockProbe) -> None:
    """Check the facts of the module docstring on one probed block.

    Raises:
        UnsupportedError: one line naming the block, what differs and the fix.
    """
    spec = spec.for_block(probe.index)  # the probed block's own linears where blocks differ
    where = probe.prefix
    present = {name for name, m in probe.block.named_modules() if isinstance(m, nn.Linear)}
    extra = sorted(present - set(spec.linears) - set(spec.float_linears))
    if extra:
        raise layout_error(spec, f"{where} has linears the layout does not list: {', '.join(extra)}")
    fused = sorted(name for name, p in probe.block.named_parameters() if p.dim() > 2)
    if fused:  # stacked expert weights no linear hook would see: never leave them in float silently
        raise layout_error(spec, f"{where} has fused expert weights qtool would not quantize: {', '.join(fused)}")
    for name in spec.linears:
        count = probe.calls.count(name)
        # a routed expert runs once, or not at all when the router sends it no probe token
        if count != 1 and not (count == 0 and expert_of(spec, name) is not None):
            raise layout_error(spec, f"{where}.{name} runs {count} times in one forward, not once")
    ran = [group for group in spec.sequential if all(name in probe.calls for name in group)]
    first = {name: probe.calls.index(name) for group in ran for name in group}
    last = {name: len(probe.calls) - 1 - probe.calls[::-1].index(name) for group in ran for name in group}
    for group in ran:
        for name in group[1:]:
            if not torch.equal(probe.inputs[name], probe.inputs[group[0]]):
                raise layout_error(spec, f"{where}.{name} does not read the same input as {group[0]}")
    for earlier, later in zip(ran, ran[1:]):
        if max(last[n] for n in earlier) > min(first[n] for n in later):
            raise layout_error(spec, f"in {where}, {'/'.join(later)} runs before {'/'.join(earlier)}")
    for module in (spec.attention, spec.mlp):
        if module is None:
            continue
        inside = [n for n in probe.calls if n.startswith(module + ".")]
        if module not in probe.outputs or not inside:
            raise layout_error(spec, f"{where}.{module} does not exist or runs no linear")
        if not torch.equal(probe.outputs[module], probe.outputs[inside[-1]]):
            raise layout_error(spec, f"{where}.{module} does not return its last linear's ({inside[-1]}) output")


def layout_error(spec: ArchSpec, detail: str) -> UnsupportedError:
    """The one-line refusal for a model that ``spec`` does not describe."""
    if is_registered(spec):
        return UnsupportedError(f"qtool's '{spec.name}' family file does not match this model ({detail}); "
                                "please report this model")
    return UnsupportedError(
        f"architecture '{spec.model_types[0]}' is not registered and does not have the generic Llama-like layout "
        f"({detail}); add a file under qtool/models/ for it (registered: {', '.join(supported_model_types())})")
