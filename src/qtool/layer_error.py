"""Per-layer quantization error with one meaning for every method, in percent.

Two numbers, named differently because they mean different things:

- ``rel_weight_error_pct`` = ``100 * ||W - Q||_F / ||W||_F``: how far the stored weight is
  from the float weight the method quantized. Every method reports it. ``W`` is the
  layer's float weight as it stands when it is quantized (for AWQ: after its scales are
  folded in, i.e. the weight the checkpoint stores), ``Q`` the dequantized codes.
- ``rel_output_error_pct`` = ``100 * ||X (W - Q)^T||_F / ||X W^T||_F``: how far the
  layer's output moves on the calibration inputs ``X`` the method fitted it on, computed
  from their Gram matrix ``X^T X`` (any positive multiple of it, e.g. GPTQ's Hessian
  ``2/N X^T X``, gives the same ratio). Methods that see calibration inputs report it
  (GPTQ: every calibration token; AWQ: its search tokens, in the scaled space, where it
  equals the error of the unscaled layer); RTN sees none and does not.

``worst_layer_error`` picks the one to show for a set of layers: the output error when
every layer has it, else the weight error.
"""

from __future__ import annotations

import math
from typing import Any

import torch

WEIGHT_KEY = "rel_weight_error_pct"
OUTPUT_KEY = "rel_output_error_pct"
LABELS = {OUTPUT_KEY: "relative output error", WEIGHT_KEY: "relative weight error"}


def rel_weight_error_pct(weight, dequantized) -> float:
    """``100 * ||W - Q||_F / ||W||_F`` (float64 sums); 0 for an all-zero ``W``.

    Args:
        weight: float ``[n, k]``, the float weight that was quantized.
        dequantized: float ``[n, k]``, its dequantized codes (same device).
    """
    w = weight.detach().float()
    num = float((w - dequantized.float()).square().sum(dtype=torch.float64))
    den = float(w.square().sum(dtype=torch.float64))
    return 100.0 * math.sqrt(num / den) if den > 0 else 0.0


def rel_output_error_pct(weight, dequantized, gram) -> float:
    """``100 * sqrt(tr(D G D^T) / tr(W G W^T))`` with ``D = W - Q`` and ``G`` the Gram
    matrix of the layer's inputs (float ``[k, k]``, symmetric PSD, any positive scale);
    0 when the inputs never excite ``W``.

    Args:
        weight: float ``[n, k]``.
        dequantized: float ``[n, k]``.
        gram: float ``[k, k]``.
    """
    w = weight.detach().float()
    g = gram.to(w.device, torch.float32)
    d = w - dequantized.to(w.device).float()
    num = float(((d @ g) * d).sum(dtype=torch.float64))
    den = float(((w @ g) * w).sum(dtype=torch.float64))
    return 100.0 * math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


def layer_errors(weight, dequantized, gram=None) -> dict[str, float]:
    """The per-layer error entries for ``qtool.json``: the weight error always, the
    output error when the Gram matrix of the calibration inputs is given."""
    out = {WEIGHT_KEY: rel_weight_error_pct(weight, dequantized)}
    if gram is not None:
        out[OUTPUT_KEY] = rel_output_error_pct(weight, dequantized, gram)
    return out


def worst_layer_error(layers: dict[str, dict[str, Any]]) -> tuple[str, float, str] | None:
    """``(label, worst value in %, layer name)`` over ``layers`` (name -> stats), with the
    output error when every layer has it, else the weight error; None when the layers
    carry neither (checkpoints written before these keys existed)."""
    for key in (OUTPUT_KEY, WEIGHT_KEY):
        if layers and all(key in s for s in layers.values()):
            name = max(layers, key=lambda n: layers[n][key])
            return LABELS[key], layers[name][key], name
    return None


def error_summary(layers: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Worst and mean of the error ``worst_layer_error`` would show, with its key,
    label and the worst layer; None when the layers carry no error."""
    found = worst_layer_error(layers)
    if found is None:
        return None
    label, worst, name = found
    key = OUTPUT_KEY if label == LABELS[OUTPUT_KEY] else WEIGHT_KEY
    values = [s[key] for s in layers.values()]
    return {"key": key, "label": label, "unit": "%", "worst": worst, "worst_layer": name,
            "mean": sum(values) / len(values)}
