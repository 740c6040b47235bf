"""What ``qtool inspect`` says first about a checkpoint: method, bits, group size, format,
size on disk, worst and mean layer error, and how many of the model's linears are
quantized; plus the natural order of layer names (``layers.2`` before ``layers.10``).

Reads ``config.json`` and the safetensors headers only (no tensor data).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from qtool.layer_error import LABELS, OUTPUT_KEY, WEIGHT_KEY, error_summary


def natural_key(name: str) -> tuple:
    """Sort key that orders the digit runs of ``name`` as numbers:
    ``model.layers.2.mlp`` < ``model.layers.10.mlp``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part)


def safetensors_shapes(folder: Path) -> dict[str, list[int]]:
    """Tensor name -> shape for every ``*.safetensors`` file in ``folder``, from the
    files' JSON headers (8-byte little-endian length, then the header)."""
    shapes: dict[str, list[int]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def float_linears(folder: Path, quantized: set[str]) -> list[str]:
    """Linears left in float: 2-D ``*.weight`` tensors outside the quantized layers that
    are not embeddings, and an ``lm_head`` tied to the embeddings (stored once, as the
    embedding)."""
    shapes = safetensors_shapes(folder)
    names = [k[: -len(".weight")] for k, shape in shapes.items()
             if k.endswith(".weight") and len(shape) == 2 and "embed" not in k
             and k[: -len(".weight")] not in quantized]
    config = json.loads((folder / "config.json").read_text())
    if config.get("tie_word_embeddings") and "lm_head.weight" not in shapes:
        names.append("lm_head")
    return sorted(names, key=natural_key)


def checkpoint_summary(folder: str | Path, record: dict) -> dict[str, Any]:
    """The summary of a qtool checkpoint ``folder`` whose ``qtool.json`` is ``record``.

    Returns:
        ``size_bytes`` (safetensors files), ``files`` (their count), ``linears_quantized``,
        ``linears_total``, ``float_linears`` (names), ``error`` (``layer_error.error_summary``:
        key, label, unit ``%``, worst, worst_layer, mean; None for checkpoints written
        before qtool recorded relative errors), ``coverage`` (the run's ``coverage``
        record, ``qtool.coverage.Coverage.to_json``: weights and parameters quantized and
        why the rest stayed in float; None for checkpoints written before qtool recorded it).
    """
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    layers = record.get("layers", {})
    left = float_linears(folder, set(layers))
    return {"size_bytes": sum(f.stat().st_size for f in files), "files": len(files),
            "linears_quantized": len(layers), "linears_total": len(layers) + len(left), "float_linears": left,
            "error": error_summary(layers), "coverage": record.get("coverage")}


WORST_SHOWN = 5


def expert_lines(layers: dict) -> list[str]:
    """``qtool inspect``'s lines on the routed experts of an MoE checkpoint: how many
    experts got each low-token policy (``qtool.models.moe``) and the fewest routed
    calibration tokens; none for dense models or runs without calibration (RTN)."""
    experts = {name.rpartition(".")[0]: stats for name, stats in layers.items() if "expert_tokens" in stats}
    if not experts:
        return []
    policies: dict[str, int] = {}
    for stats in experts.values():
        policies[stats["expert_policy"]] = policies.get(stats["expert_policy"], 0) + 1
    fewest = min(experts, key=lambda n: experts[n]["expert_tokens"])
    low = sorted((n for n, s in experts.items() if s["expert_policy"] != "calibrated"), key=natural_key)
    return [f"experts: {len(experts)} routed experts, " + ", ".join(f"{k} {v}" for k, v in sorted(policies.items()))
            + f"; fewest calibration tokens: {experts[fewest]['expert_tokens']} ({fewest})"
            + (f"; low-token policy applied to {', '.join(low[:4])}" + (f" and {len(low) - 4} more" if len(low) > 4 else "")
               if low else "")]


def _layer_line(name: str, stats: dict, all_stats: bool) -> str:
    errors = [f"{LABELS[k].replace('relative ', '')} {stats[k]:.2f}%" for k in (OUTPUT_KEY, WEIGHT_KEY) if k in stats]
    shape = f" [{stats['shape'][0]}x{stats['shape'][1]}]" if "shape" in stats else ""
    rest = ""
    if all_stats:
        rest = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()
                         if k not in (OUTPUT_KEY, WEIGHT_KEY, "shape"))
    return f"  {name}{shape}: " + "; ".join(part for part in (", ".join(errors), rest) if part)


def width_lines(info: dict, all_layers: bool) -> list[str]:
    """Per-layer widths (``--bits-budget``): how many linears at each width, the bits per
    weight against the budget, and which linears are wider (the first few, or all)."""
    wide = info.get("layer_bits") or {}
    if not wide:
        return []
    budget = info.get("bits_budget")
    if budget:
        from qtool.api import budget_line

        head = f"mixed precision: {budget_line(budget)}"
    else:
        head = f"mixed precision: {len(wide)} linears not at {info['bits']} bits"
    names = sorted(wide, key=natural_key)
    shown = names if all_layers else names[:WORST_SHOWN]
    more = "" if len(shown) == len(names) else f" and {len(names) - len(shown)} more (all with --layers)"
    return [head, "  wider: " + ", ".join(f"{n} ({wide[n]})" for n in shown) + more]


def render_inspect(checkpoint: str, info: dict, all_layers: bool = False) -> str:
    """The text of ``qtool inspect``: the summary lines, the calibration, then the
    ``WORST_SHOWN`` worst layers by the summary's error (every layer in natural order,
    with all its stats, when ``all_layers``). ``info`` is ``api.inspect_checkpoint``'s."""
    summ, layers = info["summary"], info["layers"]
    lines = [f"{checkpoint}: {info['method']} {info['bits']}-bit group {info['group_size']} "
             f"{'sym' if info['sym'] else 'asym'}, format {info['format']}, qtool {info['qtool_version']}"]
    model = info.get("model") or {}
    if model:
        lines.append(f"model: {model.get('source')} ({model.get('architecture')})")
    lines.append(f"size on disk: {summ['size_bytes'] / 1e6:.1f} MB in {summ['files']} safetensors file(s)")
    left = summ["float_linears"]
    shown_left = ", ".join(left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")
    if summ.get("coverage"):  # the run's own record: weights, parameters and a reason per float group
        lines.append(f"coverage: {summ['coverage']['line']}")
    else:
        lines.append(f"coverage: {summ['linears_quantized']} of {summ['linears_total']} linears quantized"
                     + (f" (float: {shown_left})" if left else ""))
    err = summ["error"]
    if err:
        lines.append(f"error: {err['label']}, worst {err['worst']:.2f}% ({err['worst_layer']}), "
                     f"mean {err['mean']:.2f}% over {summ['linears_quantized']} layers")
    else:
        lines.append("error: not recorded (checkpoint written before qtool recorded relative errors)")
    timings = info.get("timings_s") or {}
    if timings:
        lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    cal = info.get("calibration")
    lines.append(f"calibration: {cal['source']} ({cal['nsamples']} x {cal['seqlen']} tokens, "
                 f"sha256 {cal['tokens_sha256'][:12]})" if cal else "calibration: none")
    lines += expert_lines(layers)
    lines += width_lines(info, all_layers)
    if all_layers:
        lines.append(f"layers ({len(layers)}, in layer order):")
        lines += [_layer_line(name, stats, True) for name, stats in layers.items()]
    elif layers:
        names = sorted(layers, key=lambda n: -layers[n][err["key"]]) if err else list(layers)
        lines.append(f"{'worst' if err else 'first'} {min(WORST_SHOWN, len(layers))} of {len(layers)} layers "
                     "(all of them with --layers):")
        lines += [_layer_line(name, layers[name], False) for name in names[:WORST_SHOWN]]
    return "\n".join(lines)
