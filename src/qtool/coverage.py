"""Coverage you can see: which weights of a model a run quantizes and, for every weight it
keeps in float, why.

``plan_coverage`` classifies every parameter of the model before calibration:

- *quantized*: the weight of a linear that the family file lists (``ArchSpec.sequential``)
  in a decoder block, unless the user excluded it;
- kept in float, by reason: ``embeddings`` (``nn.Embedding`` tables: looked up, not
  multiplied), ``lm_head`` (the output projection; left in float by every format qtool
  writes; stored once when tied to the embeddings), ``norms`` and ``biases`` (vectors:
  per-channel scales AWQ folds into, and the biases of linears, stored in float beside
  them), ``float_linears`` (linears the family file keeps in float, e.g. a router),
  ``excluded`` (``--exclude PATTERN``, fnmatch on full module names);
- ``float_modules``: every parameter of a model-level module the family file keeps in
  float as a whole (a vision-language model's vision tower and projector);
- anything else (a weight matrix that is neither quantized nor in one of these groups,
  e.g. a linear outside the decoder blocks) is *uncovered*: the run is refused before
  calibration unless the user excludes it.

``Coverage.line()`` is the sentence every run prints and ``Coverage.to_json()`` the
``coverage`` record of ``qtool.json``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import nn

from qtool.errors import UserInputError
from qtool.models import get_blocks
from qtool.models.base import ArchSpec

REASONS = {
    "embeddings": "embedding tables are looked up, not multiplied",
    "lm_head": "the output projection; formats keep it in float",
    "norms": "per-channel vectors (AWQ folds its scales into them)",
    "biases": "biases of linears, stored in float beside them",
    "float_linears": "kept in float by the family file",
    "float_modules": "vision tower and projector, kept in float by the family file",
    "excluded": "excluded by --exclude",
    "other": "other vectors and scalars of the model",
}


@dataclass
class KeptGroup:
    """Tensors kept in float for one reason: ``tensors`` parameter names, ``params`` elements."""

    reason: str
    tensors: list[str] = field(default_factory=list)
    params: int = 0


@dataclass
class Coverage:
    """Attributes:
        quantized: full module names of the linears to quantize, in model order.
        quantized_params: elements of their weights.
        weights: weight *matrices* in the model (2-D or more parameters, tied ones once).
        total_params: elements of every parameter (tied ones once).
        kept: reason key (``REASONS``) -> ``KeptGroup``.
        tied_lm_head: the output projection shares the embedding's tensor.
        exclude: the user's patterns.
    """

    quantized: list[str]
    quantized_params: int
    weights: int
    total_params: int
    kept: dict[str, KeptGroup]
    tied_lm_head: bool
    exclude: tuple[str, ...]

    @property
    def percent(self) -> float:
        return 100.0 * self.quantized_params / self.total_params if self.total_params else 0.0

    def line(self) -> str:
        """``quantized N of M weights (x% of parameters); kept in float: ...``."""
        parts = []
        for key, group in self.kept.items():
            what = f"{key} ({len(group.tensors)} tensor{'s' if len(group.tensors) != 1 else ''}, " \
                   f"{_count(group.params)} params: {group.reason})"
            if key == "lm_head" and self.tied_lm_head:
                what = "lm_head (tied to the embeddings, stored once with them)"
            parts.append(what)
        if self.tied_lm_head and "lm_head" not in self.kept:
            parts.append("lm_head (tied to the embeddings, stored once with them)")
        return (f"quantized {len(self.quantized)} of {self.weights} weights ({self.percent:.1f}% of parameters); "
                f"kept in float: {', '.join(parts) if parts else 'nothing'}")

    def to_json(self) -> dict:
        return {"quantized": len(self.quantized), "weights": self.weights,
                "quantized_params": self.quantized_params, "total_params": self.total_params,
                "percent_params": round(self.percent, 3), "tied_lm_head": self.tied_lm_head,
                "exclude": list(self.exclude),
                "kept_in_float": {k: {"reason": g.reason, "tensors": len(g.tensors), "params": g.params,
                                      "names": g.tensors if k in ("float_linears", "excluded") else g.tensors[:3]}
                                  for k, g in self.kept.items()},
                "line": self.line()}


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10**5 else str(n)


def plan_coverage(model: nn.Module, spec: ArchSpec, exclude: tuple[str, ...] = ()) -> Coverage:
    """Classify every parameter of ``model`` (see the module docstring).

    Raises:
        UserInputError: an ``exclude`` pattern matches no module, or a weight matrix would
            be left in float without a reason; one line naming it and ``--exclude``.
    """
    listed: dict[str, str] = {}  # full linear name -> "quantize" | "float_linears"
    for i, _ in enumerate(get_blocks(model, spec)):
        prefix, block_spec = f"{spec.blocks}.{i}", spec.for_block(i)  # blocks may differ (dense and MoE)
        listed.update({f"{prefix}.{n}": "quantize" for n in block_spec.linears})
        listed.update({f"{prefix}.{n}": "float_linears" for n in block_spec.float_linears})
    modules = dict(model.named_modules())
    float_modules = getattr(spec, "float_modules", ())  # model-level modules kept whole (a VLM's vision tower)
    used = {p: False for p in exclude}

    def excluded(name: str) -> bool:
        hits = [p for p in exclude if fnmatch.fnmatchcase(name, p)]
        for p in hits:
            used[p] = True
        return bool(hits)

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    quantized, q_params, weights, total = [], 0, 0, 0
    kept: dict[str, KeptGroup] = {}
    uncovered = []
    for pname, param in model.named_parameters():  # tied tensors appear once
        mname, _, leaf = pname.rpartition(".")
        module = modules.get(mname)
        total += param.numel()
        matrix = param.dim() >= 2
        weights += matrix
        role = listed.get(mname)
        if isinstance(module, nn.Linear) and leaf == "weight" and role == "quantize" and not excluded(mname):
            quantized.append(mname)
            q_params += param.numel()
            continue
        if isinstance(module, nn.Linear) and leaf == "bias" and (role == "quantize" or excluded(mname)):
            key = "biases"
        elif role == "float_linears":
            key = "float_linears"
        elif any(pname.startswith(m + ".") for m in float_modules):
            key = "float_modules"
        elif isinstance(module, nn.Embedding):
            key = "embeddings"
        elif module is not None and module is out_emb:
            key = "lm_head"
        elif matrix and excluded(mname):
            key = "excluded"
        elif matrix or isinstance(module, nn.Linear):
            uncovered.append(pname)
            continue
        elif "norm" in type(module).__name__.lower():
            key = "norms"
        else:
            key = "other"
        group = kept.setdefault(key, KeptGroup(REASONS[key]))
        group.tensors.append(pname)
        group.params += param.numel()
    unused = [p for p, hit in used.items() if not hit]
    if unused:
        raise UserInputError(f"--exclude {unused[0]} matches no quantizable weight of this model; "
                             f"check the pattern against full module names such as {quantized[0] if quantized else spec.blocks + '.0'}")
    if uncovered:
        raise UserInputError(f"{len(uncovered)} weight(s) would stay in float without a reason, e.g. {uncovered[0]}: "
                             f"qtool's '{spec.name}' family file does not quantize them; keep them in float explicitly "
                             f"with --exclude '{uncovered[0].rpartition('.')[0]}' or report this model")
    order = list(REASONS)
    return Coverage(quantized, q_params, weights, total, dict(sorted(kept.items(), key=lambda kv: order.index(kv[0]))),
                    tied, tuple(exclude))


def excluded_in_block(coverage: Coverage, spec: ArchSpec, prefix: str) -> set[str]:
    """Linears (relative to the block at ``prefix``) that the run keeps in float on the
    user's request."""
    quantized = set(coverage.quantized)
    return {n for n in spec.for_block(int(prefix.rpartition(".")[2])).linears if f"{prefix}.{n}" not in quantized}
