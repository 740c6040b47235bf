"""qtool: offline LLM weight quantization (AWQ, GPTQ, RTN) to GPTQ, AWQ, Marlin and
compressed-tensors checkpoints."""

__version__ = "0.1.0"

__all__ = ["QuantizedWeight", "__version__"]


def __getattr__(name: str):
    # torch is imported on first use only, so `qtool --version` and `--help` stay fast
    if name == "QuantizedWeight":
        from qtool.qtensor import QuantizedWeight

        return QuantizedWeight
    raise AttributeError(f"module 'qtool' has no attribute {name!r}")
