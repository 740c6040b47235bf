"""Checkpoint formats: canonical ``QuantizedWeight`` <-> on-disk tensors of one linear.

Every format module exposes the same small API: ``NAME``, ``TENSOR_SUFFIXES``, ``ACT_ORDER``
(the GPTQ act-order kind written by default, ``"dynamic"`` or ``"static"``: what the
format's clients load), ``layer_shape``, ``check_options``, ``check_layer``, ``pack``,
``unpack``, ``quantization_config`` and ``options_from_config``. Formats whose config
states per-layer widths (``--bits-budget``) take ``layers={name: bits}`` in
``quantization_config`` and return them as ``layers`` from ``options_from_config``
(``layer_params`` resolves one module). Converting format A to format B is ``A.unpack`` then ``B.pack``.
Adding a format is one new module plus one line in ``FORMATS``.
"""

from __future__ import annotations

import re
from types import ModuleType

from qtool.errors import UserInputError
from qtool.pack import awq, compressed_tensors, gptq, marlin

FORMATS: dict[str, ModuleType] = {
    gptq.NAME: gptq,
    awq.NAME: awq,
    marlin.NAME: marlin,
    compressed_tensors.NAME: compressed_tensors,
}


def get_format(name: str) -> ModuleType:
    """The format module registered as ``name``.

    Raises:
        UserInputError: unknown name (the message lists the supported ones).
    """
    try:
        return FORMATS[name]
    except KeyError:
        raise UserInputError(
            f"unknown format {name!r}; supported: {', '.join(sorted(FORMATS))}"
        ) from None


def layer_params(params: dict, module: str) -> dict:
    """``params`` (from a format's ``options_from_config``) for one module: the first of its
    per-layer ``layers`` entries, in the format's order of precedence, that matches the
    module name (``"exact"``: equal; ``"regex"``: ``re.match``) overrides bits, group size
    and symmetry; without ``layers`` or a match, ``params`` as they are."""
    for kind, pattern, override in params.get("layers") or ():
        if (module == pattern) if kind == "exact" else re.match(pattern, module):
            return {**params, **override}
    return params
