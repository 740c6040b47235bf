"""The GPTQ Hessian of one linear layer, accumulated from streamed calibration inputs.

For a linear ``y = x W^T`` the layer-wise objective ``||X W^T - X Q^T||^2`` has the Hessian
``H = 2/N * X^T X`` (``X``: ``[N, k]``, every token of every sample one row). Inputs arrive
in chunks of any size; a running-mean update keeps ``H`` normalised by the rows seen so far,
so the result does not depend on how the rows were chunked (up to float rounding).
"""

from __future__ import annotations

import torch

from qtool.errors import NumericsError


class HessianAccumulator:
    """Running ``H = 2/N * sum_rows x^T x`` for one linear with ``in_features`` inputs.

    Args:
        in_features: ``k``, the last dimension of every input.
        name: the layer's name, used in error messages.
        device: where ``H`` lives (default CPU); inputs are moved there.
    """

    def __init__(self, in_features: int, name: str = "", device: torch.device | str | None = None):
        self.in_features = in_features
        self.name = name
        self._h = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self._nsamples = 0
        parts = max(1, min(4, in_features // 256))
        edges = [round(i * in_features / parts) for i in range(parts + 1)]
        self._panels = list(zip(edges[:-1], edges[1:]))

    @property
    def nsamples(self) -> int:
        """``N``: the number of input rows (tokens) accumulated so far."""
        return self._nsamples

    @property
    def hessian(self) -> torch.Tensor:
        """float32 ``[k, k]``, symmetric PSD (a new tensor)."""
        h = self._h.clone()
        for a0, a1 in self._panels[1:]:
            h[a0:a1, :a0] = h[:a0, a0:a1].t()
        return h

    def add(self, x: torch.Tensor) -> None:
        """Fold a chunk of inputs into ``H``.

        Args:
            x: any float dtype, ``[..., k]``; every leading index is one row.

        Raises:
            NumericsError: ``x`` holds NaN or inf.
            ValueError: the last dimension is not ``k``.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"HessianAccumulator {self.name!r}: input last dim {x.shape[-1]} != "
                f"in_features {self.in_features}"
            )
        rows = x.detach().reshape(-1, self.in_features).to(self._h.device, torch.float32)  # [m, k]
        if not torch.isfinite(rows).all():
            raise NumericsError(
                f"layer {self.name!r}: calibration activations contain NaN/inf; "
                "check the model dtype (try float32 or bfloat16) and the calibration data"
            )
        m = rows.shape[0]
        if m == 0:
            return
        total = self._nsamples + m
        # H_new = N/(N+m) * H_old + 2/(N+m) * X^T X, folded as one scaled rank-m update
        self._h.mul_(self._nsamples / total)
        rows = rows * (2.0 / total) ** 0.5
        # H is symmetric: accumulate only row panels from the diagonal rightwards (about
        # 30% less multiply work with 4 panels); ``hessian`` mirrors the lower triangle
        for a0, a1 in self._panels:
            self._h[a0:a1, a0:].addmm_(rows[:, a0:a1].t(), rows[:, a0:])
        self._nsamples = total
