"""What a refusal may suggest: option changes that were tried and work.

The formats (``qtool.pack``) say why they cannot store a layer or an option set, in their
own terms. The fix a user reads is computed here, per command: for ``qtool quantize`` every
combination of ``--group-size``, ``--sym/--asym``, the act-order switches and ``--bits``
(with the current format, then with each other ``--format``) is checked against the
format's rules and the model's real layer shapes, and only combinations that pass are
named, fewest changes first; for ``qtool convert`` the other ``--to`` formats that hold the
weights exactly, and whether re-quantizing could reach the target at all. When nothing
works, the message says so and why, instead of pointing at another refusal.

``shapes`` maps a quantized linear's name to ``(out_features n, in_features k)``; ``None``
means not known yet (before the model is read), where only the options are checked.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from qtool.config import (GPTQ_METHODS, GROUP_SIZE_CANDIDATES, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, QuantizeConfig,
                          resolve_group_size)
from qtool.errors import QtoolError, UnsupportedError, UserInputError
from qtool.io import format_options
from qtool.pack import FORMATS, get_format

Shapes = dict[str, tuple[int, int]]


@dataclass(frozen=True)
class Problem:
    """Why a config cannot quantize and store some layers. ``text`` is the full sentence
    (starting with the option at fault), ``short`` the bare reason used when listing what
    was tried, ``error`` the type to raise, ``layers`` whether it comes from the model's
    layer shapes (rather than from the options alone)."""

    text: str
    short: str
    error: type[QtoolError]
    layers: bool = False


def _distinct(shapes: Shapes) -> Shapes:
    """One representative layer name per distinct ``(n, k)``, in order: the checks depend
    only on the shape."""
    seen: dict[tuple[int, int], str] = {}
    for name, shape in shapes.items():
        seen.setdefault(shape, name)
    return {name: shape for shape, name in seen.items()}


def _group_problem(config: QuantizeConfig, shapes: Shapes | None) -> Problem | None:
    if shapes is None or config.group_size == -1:
        return None
    ks = {name: k for name, (_, k) in shapes.items()}
    if config.group_size == 0:
        if any(all(k % g == 0 for k in ks.values()) for g in GROUP_SIZE_CANDIDATES):
            return None
        first = next(iter(ks.items()))
        return Problem("no group size of 128/64/32 divides every layer's in_features",
                       f"{first[0]} has in_features={first[1]}", UserInputError, True)
    bad = {name: k for name, k in ks.items() if k % config.group_size}
    if not bad:
        return None
    shown = ", ".join(f"{n} (in_features={k})" for n, k in list(bad.items())[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    first = next(iter(bad.items()))
    return Problem(f"--group-size {config.group_size} does not divide {shown}{more}",
                   f"{first[0]} has in_features={first[1]}, not a multiple of {config.group_size}", UserInputError,
                   True)


def _format_problem(config: QuantizeConfig, shapes: Shapes | None, auto: bool) -> Problem | None:
    """The format's refusal of ``config`` (group size already resolved)."""
    fmt = get_format(config.format)
    opts = format_options(config.format, config)

    def where(reason: str) -> str:  # the automatic group size is named when the refusal is about groups
        auto_note = f" with the automatic group size {config.group_size}" if auto and "group" in reason else ""
        return f"--format {config.format}{auto_note}"

    reason = fmt.check_options(config.bits, config.group_size, config.symmetric, config.uses_act_order, **opts)
    if reason:
        return Problem(f"{where(reason)}: {reason}", reason, UnsupportedError)
    if shapes is None:
        return None
    failures = {}
    for name, (n, k) in _distinct(shapes).items():
        reason = fmt.check_layer(n, k, config.bits, config.group_size, config.symmetric, config.uses_act_order, **opts)
        if reason:
            failures[(n, k)] = (name, reason)
    if not failures:
        return None
    count = sum(1 for shape in shapes.values() if shape in failures)
    name, reason = next(iter(failures.values()))
    return Problem(f"{where(reason)} cannot store {count} of {len(shapes)} layers, e.g. {name}: {reason}",
                   f"{name}: {reason}", UnsupportedError, True)


def plan_problem(config: QuantizeConfig, shapes: Shapes | None) -> Problem | None:
    """Why ``config`` cannot quantize and store layers of ``shapes``, or ``None``.

    With ``shapes`` None and the automatic group size, the options pass when any size auto
    could choose (128, 64, 32) passes."""
    problem = _group_problem(config, shapes)
    if problem:
        return problem
    auto = config.group_size == 0
    if not auto:
        return _format_problem(config, shapes, False)
    if shapes is None:
        tried = [_format_problem(config.replace(group_size=g), None, True) for g in GROUP_SIZE_CANDIDATES]
        return None if any(p is None for p in tried) else tried[0]
    resolved = resolve_group_size(config, {name: k for name, (_, k) in shapes.items()})
    return _format_problem(resolved, shapes, True)


# --- quantize: the option space a fix may move in -------------------------------------

def _moves(config: QuantizeConfig) -> list[list[tuple[str, dict]]]:
    """Per option slot, the alternatives to the current setting as ``(flags, changes)``."""
    groups = [(f"--group-size {g}", {"group_size": g}) for g in (128, 64, 32, -1)
              if g in SUPPORTED_GROUP_SIZES and g != config.group_size]
    sym = [("--asym", {"sym": False}) if config.symmetric else ("--sym", {"sym": True})]
    order = []
    if config.method in GPTQ_METHODS and config.act_order and not config.static_groups:
        order = [("--no-act-order", {"act_order": False}), ("--static-groups", {"static_groups": True})]
    bits = [(f"--bits {b}", {"bits": b}) for b in SUPPORTED_BITS if b != config.bits]
    return [slot for slot in (groups, sym, order, bits) if slot]


def _combinations(config: QuantizeConfig, shapes: Shapes | None):
    """``(flags, config)`` for every combination of moves (at most one per slot), fewest
    changes first; combinations the config itself rejects are skipped."""
    slots = _moves(config)
    for size in range(1, len(slots) + 1):
        for chosen in itertools.combinations(slots, size):
            for picks in itertools.product(*chosen):
                changes = {key: value for _, change in picks for key, value in change.items()}
                try:
                    candidate = config.replace(**changes)
                except UserInputError:
                    continue
                yield " ".join(flags for flags, _ in picks), candidate


def _working_configs(config: QuantizeConfig, shapes: Shapes | None, limit: int) -> list[tuple[str, QuantizeConfig]]:
    """Up to ``limit`` ``(flags, config)`` that work, all with the fewest changes."""
    found, size = [], None
    for flags, candidate in _combinations(config, shapes):
        n = flags.count("--")
        if size is not None and n > size:
            break
        if plan_problem(candidate, shapes) is None:
            found.append((flags, candidate))
            size = n
            if len(found) == limit:
                break
    return found


def _working(config: QuantizeConfig, shapes: Shapes | None, limit: int) -> list[str]:
    """Up to ``limit`` flag sets that make ``config`` work, all with the fewest changes."""
    return [flags for flags, _ in _working_configs(config, shapes, limit)]


_WORDS = {"--asym": "asymmetric", "--sym": "symmetric", "--no-act-order": "without act-order",
          "--static-groups": "with static groups", "--group-size -1": "per channel"}


def _in_words(flags: str) -> str:
    """``--group-size 128`` -> ``group size 128``: for messages of a command without these options."""
    return _WORDS.get(flags) or flags.removeprefix("--").replace("-", " ").replace("bits ", "bits=")


def _why_not(config: QuantizeConfig, shapes: Shapes | None, problem: Problem, limit: int = 3,
             words: bool = False) -> str:
    """What the single changes run into, e.g. ``--group-size 128: ...; --group-size -1:
    ...``: with known shapes only the reasons that come from them (the model's part), and
    not a reason that differs from one already given only in its numbers."""
    def kind(short: str) -> str:
        return re.sub(r"\d+", "N", short)

    seen, parts = {kind(problem.short)}, []
    for flags, candidate in _combinations(config, shapes):
        if flags.count("--") > 1:
            break
        other = plan_problem(candidate, shapes)
        if other is not None and (other.layers or shapes is None) and kind(other.short) not in seen:
            seen.add(kind(other.short))
            parts.append(f"{_in_words(flags) if words else flags}: {other.short}")
            if len(parts) == limit:
                break
    return "; ".join(parts)


def quantize_fix(config: QuantizeConfig, shapes: Shapes | None, problem: Problem) -> str:
    """The fix clause for a refused quantize ``config``: option sets that work for these
    shapes, or a statement that none does with this format (and why), plus the other
    formats that would work."""
    same = _working(config, shapes, limit=3)
    others = []
    for name in sorted(FORMATS):
        if name == config.format:
            continue
        base = config.replace(format=name)
        if plan_problem(base, shapes) is None:
            others.append(f"--format {name}")
        else:
            found = _working(base, shapes, limit=1)
            if found:
                others.append(f"--format {name} {found[0]}")
    checked = "this model" if shapes is not None else "these options (the layer shapes are checked after loading)"
    if same:
        text = f"what works for {checked}: {', '.join(same)}"
        return text + (f" (or {', '.join(others)})" if others else "")
    why = _why_not(config, shapes, problem)
    text = (f"no setting of --group-size, --bits, --sym/--asym or act-order makes --format {config.format} work for "
            f"{checked}" + (f" ({why})" if why else ""))
    return text + (f"; formats that work: {', '.join(others)}" if others else "; no format qtool writes works either")


def check_plan(config: QuantizeConfig, shapes: Shapes | None) -> QuantizeConfig:
    """``config`` with its group size resolved for ``shapes`` (unchanged when ``shapes`` is
    None), after every option and layer-shape check.

    Raises:
        UserInputError: a group size that does not divide some layer.
        UnsupportedError: a format that cannot store the options or a layer.
        Both messages end with :func:`quantize_fix`.
    """
    problem = plan_problem(config, shapes)
    if problem:
        raise problem.error(f"{problem.text}; {quantize_fix(config, shapes, problem)}")
    if shapes is None:
        return config
    return resolve_group_size(config, {name: k for name, (_, k) in shapes.items()})


# --- convert: other targets, or what re-quantizing could do ---------------------------

def requantize_note(to: str, method: str, bits: int, group_size: int, sym: bool, act_order: bool,
                    shapes: Shapes) -> str:
    """For a checkpoint that cannot be converted to ``to``: the ``qtool quantize`` options
    that would write ``to`` for a model with these layer shapes, or why none would."""
    # a checkpoint's act-order is the dynamic kind (it carries a g_idx); static groups leave none
    config = QuantizeConfig(method=method, bits=bits, group_size=group_size, sym=sym, format=to,
                            act_order=act_order and method in GPTQ_METHODS, static_groups=False)
    problem = plan_problem(config, shapes)
    if problem is None:  # the options fit: what stopped the conversion is in the data, not the options
        return ""
    found = _working_configs(config, shapes, limit=1)
    if found:
        return f"re-quantizing the model could write {to}: `qtool quantize MODEL {_command_flags(found[0][1])}`"
    why = _why_not(config, shapes, problem, words=True)
    return f"no quantization of this model can be stored as {to} either" + (f" ({why})" if why else "")


def _command_flags(config: QuantizeConfig) -> str:
    """The ``qtool quantize`` options that give exactly ``config``'s method, format and
    quantization (nothing left to a default that depends on other options)."""
    flags = [f"--method {config.method}", f"--format {config.format}", f"--bits {config.bits}",
             f"--group-size {config.group_size}", "--sym" if config.symmetric else "--asym"]
    if config.method in GPTQ_METHODS:
        flags.append("--act-order" if config.act_order else "--no-act-order")
        if config.act_order:
            flags.append("--static-groups" if config.static_groups else "--dynamic-groups")
    return " ".join(flags)
