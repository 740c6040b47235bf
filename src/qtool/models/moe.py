"""Mixture-of-experts blocks: the experts as per-expert linears, for calibration and saving.

transformers 5 stores the routed experts of Mixtral, Qwen2/3-MoE, OLMoE and DeepSeek-V2/V3
as two fused 3-D parameters per block (``experts.gate_up_proj`` ``[E, 2I, H]``, gate rows
first, and ``experts.down_proj`` ``[E, H, I]``), not as ``nn.Linear`` modules, so a tool
that looks for linears skips them in silence; gpt-oss stores them transposed
(``[E, H, 2I]``, ``[E, I, H]``), gate and up *interleaved* (gate at even, up at odd
columns), with biases. ``unfuse_experts`` reads that layout from the flags transformers
sets on the module (``is_transposed``, ``is_concatenated``, ``has_bias``) and replaces the
module, in place, by ``PerExpertLinears``: one ``gate_proj``/``up_proj``/``down_proj``
``nn.Linear`` per expert holding the same weights (and biases), with the same forward
(the router's top-k choice, each expert on the tokens routed to it, the module's own
gating, e.g. ``act(gate) * up`` or gpt-oss's clamped SwiGLU, the routing weight
multiplying the expert's *output*). From then on every expert weight is an ordinary
linear that the pipeline, the methods and the writers see, named
``mlp.experts.{e}.gate_proj`` like the per-expert tensors on disk. The router stays in
float (it is not a linear of the block's spec).

Experts that calibration tokens rarely reach get a selectable policy (``LOW_TOKEN_POLICIES``);
``PerExpertLinears.observe_all`` is the hook for the ``all-experts`` policy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from qtool.errors import UnsupportedError

EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj")

LOW_TOKEN_POLICIES = ("all-experts", "rtn")
"""What an expert that received fewer than ``--moe-min-tokens`` routed calibration tokens gets:

- ``all-experts``: its statistics (GPTQ Hessians) come from *every* calibration token run
  through it, as if the router had chosen it for all of them; only the statistics change,
  the block's output still follows the router;
- ``rtn``: round-to-nearest, with a warning.
"""


@dataclass(frozen=True)
class MoESpec:
    """Where a block's routed experts live and how their tensors are named on disk.

    Attributes:
        experts: the experts module, relative to the block (``mlp.experts``).
        router: the router module (kept in float), relative to the block.
        after: the ``sequential`` group after which the experts run (their gate/up
            read the MoE input, like the shared expert's); None: last.
        disk_names: ``(qtool name, name on disk)`` patterns, relative to the block, with
            ``{e}`` for the expert index, where the serving engines' per-expert names differ
            from qtool's (Mixtral: ``block_sparse_moe.experts.{e}.w1``); the checkpoint is
            written and read in the disk naming.
    """

    experts: str = "mlp.experts"
    router: str = "mlp.gate"
    after: str | None = None
    disk_names: tuple[tuple[str, str], ...] = ()


class FusedGating:
    """The fused experts module's own gating on separate gate and up outputs.

    transformers gives every fused experts class an ``_apply_gate(gate_up [S, 2I]) ->
    [S, I]`` (``act(gate) * up`` by default; gpt-oss: ``(clamp(up) + 1) * g * sigmoid(alpha * g)``
    with ``g = clamp(gate)``) that reads gate and up in the module's stored layout: halves
    (``[gate | up]``) or interleaved (``gate_0, up_0, gate_1, ...``). Calling it on the two
    outputs laid out that way computes exactly what the fused forward computes.

    ``fused`` is the fused module emptied of its weight tensors (only its scalars and
    activation remain); a plain object, so it is no submodule of the expert.
    """

    def __init__(self, fused: nn.Module, interleaved: bool):
        self.fused, self.interleaved = fused, interleaved

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        both = torch.stack((gate, up), dim=-1).flatten(-2) if self.interleaved else torch.cat((gate, up), dim=-1)
        return self.fused._apply_gate(both)


class ExpertMLP(nn.Module):
    """One expert: ``down_proj(gating(gate_proj(x), up_proj(x)))``."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, gating: FusedGating):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.gating = gate_proj, up_proj, down_proj, gating

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gating(self.gate_proj(x), self.up_proj(x)))


class PerExpertLinears(nn.ModuleList):
    """The routed experts as ``ExpertMLP`` modules ``0 .. E-1``; a drop-in for the fused
    module: ``forward(hidden_states [N, H], top_k_index [N, k], top_k_weights [N, k])``.

    Attributes:
        observe_all: expert indices that run on every token (their hooks see all of
            them) while only the routed tokens' rows reach the output (the ``all-experts``
            policy); empty outside calibration.
    """

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)
        self.observe_all: set[int] = set()

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            # slot-major like transformers' loop: (k slot, token) pairs that chose expert e
            slot, token = torch.where(top_k_index.t() == e)
            if e in self.observe_all:
                y = expert(hidden_states)[token]
            elif token.numel() == 0:
                continue
            else:
                y = expert(hidden_states[token])
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def unfuse_experts(block: nn.Module, moe: MoESpec) -> int:
    """Replace ``block``'s fused experts module by ``PerExpertLinears`` with the same
    weights (copies; the fused tensors are released); idempotent. Works on meta tensors.

    Returns:
        The number of experts ``E``.

    Raises:
        UnsupportedError: the block has no experts module there, or one qtool cannot unfuse
            exactly (other parameters, no gate, a norm after each expert).
    """
    try:
        fused = block.get_submodule(moe.experts)
    except AttributeError:
        raise UnsupportedError(f"a block has no '{moe.experts}' experts module (a dense MLP in a mixture-of-experts "
                               "model: the family file must say which blocks are dense, with block_variant as in "
                               "qtool/models/deepseek.py); please report this model") from None
    if isinstance(fused, PerExpertLinears):
        return len(fused)
    # the layout flags transformers' experts decorator sets on the module (its defaults when absent)
    transposed, has_bias = getattr(fused, "is_transposed", False), getattr(fused, "has_bias", False)
    interleaved = not getattr(fused, "is_concatenated", True)
    names = {n for n, _ in fused.named_parameters(recurse=False)}
    expected = {"gate_up_proj", "down_proj"} | ({"gate_up_proj_bias", "down_proj_bias"} if has_bias else set())
    if (names != expected or not getattr(fused, "has_gate", True) or getattr(fused, "has_post_expert_norm", False)
            or not hasattr(fused, "_apply_gate")):
        raise UnsupportedError(f"experts module {type(fused).__name__} has parameters {sorted(names)}, not the fused "
                               "gate_up_proj/down_proj (with biases) qtool unfuses; please report this model")
    gate_up, down = fused.gate_up_proj.data, fused.down_proj.data
    if transposed:  # stored [E, in, out] (x @ W): nn.Linear wants [out, in]
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    num, two_i, hidden = gate_up.shape  # [E, 2I, H]
    inter = two_i // 2
    if down.shape != (num, hidden, inter):
        raise UnsupportedError(f"experts module {type(fused).__name__}: down_proj {tuple(down.shape)} does not match "
                               f"gate_up_proj {tuple(gate_up.shape)}; please report this model")
    gate_rows, up_rows = (slice(0, two_i, 2), slice(1, two_i, 2)) if interleaved else (slice(0, inter), slice(inter, two_i))
    gate_up_bias = fused.gate_up_proj_bias.data if has_bias else None  # [E, 2I]
    down_bias = fused.down_proj_bias.data if has_bias else None  # [E, H]

    def linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        lin.weight = nn.Parameter(weight.clone(), requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias.clone(), requires_grad=False)
        return lin

    def rows(bias: torch.Tensor | None, e: int, at: slice) -> torch.Tensor | None:
        return None if bias is None else bias[e, at]

    for name in names:  # release the fused tensors; the module keeps its gating's scalars
        delattr(fused, name)
    gating = FusedGating(fused, interleaved)
    experts = [ExpertMLP(linear(gate_up[e, gate_rows], rows(gate_up_bias, e, gate_rows)),
                         linear(gate_up[e, up_rows], rows(gate_up_bias, e, up_rows)),
                         linear(down[e], rows(down_bias, e, slice(None))), gating)
               for e in range(num)]
    parent, _, child = moe.experts.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, child, PerExpertLinears(experts))
    return num


def expand_spec(spec, num_experts: int):
    """``spec`` with the per-expert linears of ``num_experts`` experts in ``sequential``
    (each expert's gate/up, then its down, expert by expert, as the experts run), and the
    router among the modules kept in float."""
    moe: MoESpec = spec.moe
    experts = []
    for e in range(num_experts):
        base = f"{moe.experts}.{e}"
        experts += [(f"{base}.gate_proj", f"{base}.up_proj"), (f"{base}.down_proj",)]
    groups = list(spec.sequential)
    at = len(groups) if moe.after is None else 1 + next(i for i, g in enumerate(groups) if moe.after in g)
    return replace(spec, sequential=tuple(groups[:at] + experts + groups[at:]),
                   float_linears=tuple(dict.fromkeys((*spec.float_linears, moe.router))))


EXPERT_RE = re.compile(r"^(?P<experts>.+)\.(?P<e>\d+)\.(?P<linear>gate_proj|up_proj|down_proj)$")


def expert_of(spec, name: str) -> tuple[int, str] | None:
    """``(expert index, linear)`` when ``name`` (relative to a block) is a routed expert's
    linear of ``spec``, else None."""
    if getattr(spec, "moe", None) is None:
        return None
    m = EXPERT_RE.match(name)
    if m is None or m["experts"] != spec.moe.experts:
        return None
    return int(m["e"]), m["linear"]


def gptq_stages(spec) -> list[tuple[str, ...]]:
    """GPTQ's true-sequential stages: ``spec.sequential`` with the routed experts merged
    into two stages (every gate/up, then every down): experts never read each other's
    outputs, so one pass over the block collects all of their inputs."""
    stages: list[tuple[str, ...]] = []
    gate_up: list[str] = []
    downs: list[str] = []
    for group in spec.sequential:
        hit = expert_of(spec, group[0])
        if hit is None:
            stages.append(group)
        elif hit[1] == "down_proj":
            downs += group
        else:
            if not gate_up:
                stages.append(())  # placeholder: the experts' place in the order
            gate_up += group
    at = stages.index(()) if gate_up else len(stages)
    return stages[:at] + [tuple(gate_up), tuple(downs)] + stages[at + 1:] if gate_up else stages


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{e}"), r"(?P<e>\d+)") + r"(?P<rest>(\..*)?)$")


def rename(key: str, spec, to_disk: bool) -> str:
    """``key`` (a full tensor or module name) in the disk naming (``to_disk``) or back in
    qtool's (module names inside ``spec.blocks``); unchanged where ``spec`` has no
    ``disk_names`` entry for it."""
    moe = getattr(spec, "moe", None)
    prefix = spec.blocks + "."
    if moe is None or not moe.disk_names or not key.startswith(prefix):
        return key
    index, _, rel = key[len(prefix):].partition(".")
    for ours, disk in moe.disk_names:
        src, dst = (ours, disk) if to_disk else (disk, ours)
        m = _pattern(src).match(rel)
        if m is not None:
            return f"{prefix}{index}.{dst.replace('{e}', m.groupdict().get('e') or '')}{m['rest']}"
    return key


def prepare_experts(model: nn.Module, spec):
    """Unfuse the experts of every block of ``model`` (in place, ``unfuse_experts``) and
    return ``spec`` with their per-expert linears listed (``expand_spec``), for a family
    whose every block is MoE (one with dense blocks declares ``block_variant``:
    ``qtool.models.resolve_blocks``).

    Raises:
        UnsupportedError: a block without the experts module, or blocks with different
            numbers of experts.
    """
    blocks = model.get_submodule(spec.blocks)
    counts = {unfuse_experts(block, spec.moe) for block in blocks}
    if len(counts) != 1:
        raise UnsupportedError(f"the blocks of this {spec.name} model have different numbers of experts "
                               f"({sorted(counts)}); please report this model")
    return expand_spec(spec, counts.pop())


def check_method(spec, method: str) -> None:
    """Refuse, before calibration, a method qtool cannot apply to ``spec``'s experts.

    AWQ: the norm before the MoE feeds the router as well as every expert, so a scale
    folded into it also changes the router's input (the routing), unless the router is
    scaled back in float; and each expert would want its own scales from one shared norm.
    Until that is built and proven, AWQ is refused for MoE families.
    """
    if method in ("awq", "awq-gptq"):
        raise UnsupportedError(f"--method {method} is not supported for mixture-of-experts models ({spec.name}): the norm "
                               "before the experts also feeds the router, so its scales cannot be folded exactly; "
                               "use --method gptq or --method rtn")


def _moe_spec_of(model: nn.Module):
    from qtool.models import FAMILIES

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return next((s for s in FAMILIES if s.moe is not None and model_type in s.model_types), None)


def disk_renamer(model: nn.Module, to_disk: bool):
    """A function renaming full tensor/module names of ``model`` between qtool's names
    and the checkpoint's (``MoESpec.disk_names``); the identity for other families."""
    spec = _moe_spec_of(model)
    if spec is None or not spec.moe.disk_names:
        return lambda key: key
    return lambda key: rename(key, spec, to_disk)


def model_names(model: nn.Module, qweights: dict, plain: dict) -> tuple[dict, dict]:
    """Prepare a freshly built ``model`` to take a checkpoint's tensors: an MoE family's
    experts are unfused (``qtool.models.resolve_blocks``) and the checkpoint's quantized
    layers (``qweights``, by module) and plain tensors (``plain``, by tensor name) are
    renamed from the disk naming to the model's."""
    from qtool.models import resolve_blocks

    spec = _moe_spec_of(model)
    if spec is None:
        return qweights, plain
    spec = resolve_blocks(model, spec)
    return ({rename(k, spec, False): v for k, v in qweights.items()},
            {rename(k, spec, False): v for k, v in plain.items()})
