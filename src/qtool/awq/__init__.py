"""AWQ (Lin et al., MLSys 2024): activation-aware weight quantization.

One file per step, each a pure function over tensors (or a module plus cached inputs):

- ``stats``: per input of a block, mean |activation| per channel (all calibration tokens)
  and the Gram matrix ``X^T X`` of a token subsample; call arguments of scored modules.
- ``auto_scale``: grid search of the exponent ``alpha`` in ``s = mean|x|^alpha`` per
  scaling group, scored on the consuming module's output error.
- ``apply``: fold scales into the producing norm/linear and the consuming linears (exact
  in float).
- ``auto_clip``: per output channel and group, the shrink of the weight range that
  minimises the linear's output error.
- ``search_io``: search results (scales, clip bounds) as plain tensors in a file.
- ``method``: the pipeline method tying them together, then RTN with the clip bounds.
"""

from qtool.awq.apply import fold_scales
from qtool.awq.auto_clip import search_clip
from qtool.awq.auto_scale import (
    ScaleSearch,
    candidate_scales,
    search_linear_scale,
    search_module_scale,
)
from qtool.awq.fake_quant import fake_quantize
from qtool.awq.search_io import load_search, save_search

__all__ = [
    "ScaleSearch",
    "candidate_scales",
    "fake_quantize",
    "fold_scales",
    "load_search",
    "save_search",
    "search_clip",
    "search_linear_scale",
    "search_module_scale",
]
