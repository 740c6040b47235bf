"""GPTQ: Hessian accumulation from calibration inputs and the per-layer solver."""

from qtool.gptq.hessian import HessianAccumulator
from qtool.gptq.solver import GPTQResult, gptq_quantize, inverse_hessian_factor

__all__ = ["GPTQResult", "HessianAccumulator", "gptq_quantize", "inverse_hessian_factor"]
