"""qtool: offline LLM weight quantization (AWQ, GPTQ, RTN) to GPTQ, AWQ, Marlin and
compressed-tensors checkpoints."""

__version__ = "0.1.0"

from qtool.qtensor import QuantizedWeight  # noqa: E402

__all__ = ["QuantizedWeight", "__version__"]
