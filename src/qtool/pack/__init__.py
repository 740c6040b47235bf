"""Checkpoint formats: canonical ``QuantizedWeight`` <-> on-disk tensors of one linear.

Every format module exposes the same small API: ``NAME``, ``TENSOR_SUFFIXES``, ``ACT_ORDER``
(the GPTQ act-order kind written by default, ``"dynamic"`` or ``"static"``: what the
format's clients load), ``layer_shape``, ``check_options``, ``check_layer``, ``pack``,
``unpack``, ``quantization_config`` and ``options_from_config``. Converting format A to format B is ``A.unpack`` then ``B.pack``.
Adding a format is one new module plus one line in ``FORMATS``.
"""

from __future__ import annotations

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
