"""GPTQ (Frantar et al., ICLR 2023) for one linear layer.

Columns are quantized one at a time (in act-order, by decreasing ``diag(H)``, if asked);
each column's rounding error is spread onto the columns not yet quantized through the upper
Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``). Updates are applied lazily: inside a
block of ``block_size`` columns column by column, to the rest of the matrix once per block
as one matmul.

Group parameters follow the RTN rules of ``qtool.rtn`` exactly (``group_qparams``:
min-max range including 0, or with ``ratios`` its MSE-best shrink; codes from the exact
scale, the nearest float16 scale stored), so with an identity Hessian the result equals
``rtn_quantize(..., fit_scale=False)`` bit for bit. The solver emits the integer codes it
rounds to; nothing is re-derived from floats afterwards.

With ``ratios`` (``--scale-search mse``) a group's shrink is chosen when its parameters
are (at the group's first column, from the error-updated weights; or up front for
static groups), minimising the squared error of the group's columns weighted by the
Hessian diagonal ``H_cc`` (the output error a column's rounding causes on its own).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from qtool.errors import NumericsError, UserInputError
from qtool.qtensor import QuantizedWeight
from qtool.rtn import dequantize_codes, group_qparams, quantize_to_codes

logger = logging.getLogger(__name__)

MAX_DAMP = 1.0  # the damping fallback multiplies by 10 up to this fraction of mean(diag(H))


@dataclass(frozen=True)
class GPTQResult:
    """What ``gptq_quantize`` returns.

    Attributes:
        qweight: the canonical quantized weight (codes in the original column order).
        loss: ``sum((w - q)^2 / d^2) / 2`` over all weights, ``d`` the diagonal of ``U``
            at the column being quantized: the value IST-DASLab ``gptq.py`` reports
            (its ``Losses``). It equals ``tr((W - Q) H_d (W - Q)^T) / 2`` with ``H_d`` the
            damped Hessian, i.e. ``||X W^T - X Q^T||^2 / N`` plus the damping term when
            ``H = 2/N X^T X`` (dead columns count with ``W`` set to 0).
        damp_used: the damping fraction that made ``H`` factorizable (``>= damp``).
    """

    qweight: QuantizedWeight
    loss: float
    damp_used: float


# Above this size torch.cholesky_inverse runs out of cache on CPU (measured here: 0.28 s at
# k=2048, 29 s at k=5632); the inverse is then two BLAS-3 calls (7 s at 5632). Smaller
# layers keep cholesky_inverse, so their results are unchanged.
CHOLESKY_INVERSE_MAX = 4096


def _inverse_from_cholesky(lower: torch.Tensor) -> torch.Tensor:
    """``(L L^T)^-1`` from the lower Cholesky factor ``L``."""
    if lower.shape[0] <= CHOLESKY_INVERSE_MAX:
        return torch.cholesky_inverse(lower)
    eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
    inv = torch.linalg.solve_triangular(lower, eye, upper=False)  # L^-1
    return inv.T @ inv


def inverse_hessian_factor(
    hessian: torch.Tensor, damp: float, name: str = ""
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag(H)) * I)^-1``.

    Args:
        hessian: float32 ``[k, k]`` symmetric, no zero diagonal entries (not modified).
        damp: first damping fraction to try; on failure it is multiplied by 10 (with a
            warning) up to ``MAX_DAMP``.
        name: layer name for messages.

    Returns:
        ``(U, damp_used)``: ``U`` float32 ``[k, k]`` upper triangular.

    Raises:
        NumericsError: not factorizable even at ``MAX_DAMP``.
    """
    mean_diag = hessian.diagonal().mean()
    d = damp
    while True:
        h = hessian.clone()
        h.diagonal().add_(d * mean_diag)
        lower, info = torch.linalg.cholesky_ex(h)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(_inverse_from_cholesky(lower), upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                return upper, d
        if d >= MAX_DAMP:
            raise NumericsError(
                f"GPTQ layer {name!r}: Hessian is not positive definite even with damp {d:g}; "
                "check the calibration data, or pass a larger --damp"
            )
        logger.warning("GPTQ layer %r: Cholesky failed at damp %g, retrying with %g", name, d,
                       min(d * 10, MAX_DAMP))
        d = min(d * 10, MAX_DAMP)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = False,
    static_groups: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
    name: str = "",
    bias: torch.Tensor | None = None,
    ratios: torch.Tensor | None = None,
) -> GPTQResult:
    """Quantize one linear layer's weight with GPTQ.

    Args:
        weight: any float dtype ``[n, k]`` (``nn.Linear.weight``); not modified.
        hessian: float ``[k, k]``, ``2/N X^T X`` of the layer inputs (``HessianAccumulator``).
        bits: code width, 2..8.
        group_size: input channels per group, or -1 for one group per row. If it does not
            divide ``k`` the last group is shorter (``ceil(k / group_size)`` groups).
        sym: symmetric (implicit zero ``2**(bits-1)``) or asymmetric (uint8 zeros).
        act_order: solve columns in order of decreasing ``diag(H)`` (stable sort).
        static_groups: compute every group's parameters up front from the weights, for the
            contiguous groups ``c // group_size``; otherwise each group's parameters come
            from the error-updated weights when the solver reaches its first column (in
            solve order). ``group_size == -1`` always uses the whole original row.
        block_size: columns per lazy-update block.
        damp: fraction of ``mean(diag(H))`` added to the diagonal (raised on failure).
        name: layer name for messages.
        bias: optional float ``[n]``, carried unchanged into the result.
        ratios: None for min-max group ranges; else float ``[C]`` shrink ratios
            (``qtool.rtn.shrink_ratios``) searched per group, each column's squared
            error weighted by ``diag(H)`` (``qtool.rtn.mse_qparams``).

    Returns:
        ``GPTQResult``. Its ``qweight.g_idx`` is int32 ``[k]`` (group = solve position //
        ``group_size``, non-monotone) only with ``act_order`` and dynamic groups; it is
        ``None`` whenever groups are the contiguous default (no act-order, static groups,
        or ``group_size == -1``).

    Raises:
        UserInputError: an option is out of range or the shapes do not match.
        NumericsError: NaN/inf in ``weight`` or ``hessian``, or no damping rescues ``H``.
    """
    n, k = _check(weight, hessian, bits, group_size, block_size, damp, name)
    w = weight.detach().to(torch.float32).clone()  # [n, k], solved in place
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()  # [k, k]

    # dead inputs (never active): nothing to fit, pin them so that H stays invertible
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0

    g = k if group_size == -1 else group_size
    num_groups = -(-k // g)
    perm = (torch.argsort(h.diagonal(), descending=True, stable=True) if act_order
            else torch.arange(k, device=w.device))
    fresh = group_size != -1 and not static_groups  # parameters from the updated weights
    st = w.new_zeros(num_groups, n)  # float32 [G, n] scales, fp16-representable
    zt = w.new_zeros(num_groups, n)  # float32 [G, n] zeros, integers
    importance = h.diagonal().clone()  # [k] original column order
    if not fresh:
        for j in range(num_groups):
            cols = slice(j * g, (j + 1) * g)
            st[j], zt[j] = group_qparams(w[:, cols], bits, sym, ratios, importance[cols])
    gid = (torch.arange(k, device=w.device) if fresh else perm) // g  # group of each position

    # transposed, so that the column being solved is one contiguous row
    wt = w[:, perm].t().contiguous()  # [k, n] in solve order
    u, damp_used = inverse_hessian_factor(h[perm][:, perm], damp, name)
    ut = u.t().contiguous()  # [k, k] lower: ut[j, i] = u[i, j]

    codes = torch.empty(k, n, dtype=torch.uint8, device=w.device)  # solve order
    loss = w.new_zeros(())
    gid_list = gid.tolist()
    importance = importance[perm]  # solve order
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2]  # [b, n] view: in-block updates land in wt
        u1 = u[i1:i2, i1:i2]  # [b, b]
        err1 = torch.zeros_like(w1)  # [b, n] scaled errors (w - q) / d
        for i in range(i2 - i1):
            p = i1 + i
            if fresh and p % g == 0:
                group = w1[i:i + g]  # [<=g, n] current weights of the group
                if p + g > i2:  # the group runs past the block: apply its pending updates
                    tail = wt[i2:p + g] - ut[i2:p + g, i1:i2] @ err1
                    group = torch.cat([group, tail])
                st[gid_list[p]], zt[gid_list[p]] = group_qparams(group.t(), bits, sym, ratios,
                                                                 importance[p:p + group.shape[0]])
            s, z = st[gid_list[p]], zt[gid_list[p]]  # [n] each
            row = w1[i]
            c = quantize_to_codes(row, s, z, bits)  # [n] float32 integers
            codes[p] = c
            e = (row - dequantize_codes(c, s, z)) / u1[i, i]
            w1[i:].addr_(u1[i, i:], e, alpha=-1.0)
            err1[i] = e
        wt[i2:].addmm_(ut[i2:, i1:i2], err1, alpha=-1.0)
        loss += err1.square().sum()

    inv = torch.argsort(perm)
    return GPTQResult(
        qweight=QuantizedWeight(
            codes=codes[inv].t().contiguous(),
            scales=st.t().to(torch.float16).contiguous(),
            zeros=None if sym else zt.t().to(torch.uint8).contiguous(),
            g_idx=gid[inv].to(torch.int32) if act_order and fresh else None,
            bits=bits,
            group_size=group_size,
            sym=sym,
            bias=None if bias is None else bias.detach().clone(),
        ),
        loss=loss.item() / 2,
        damp_used=damp_used,
    )


def _check(weight, hessian, bits, group_size, block_size, damp, name) -> tuple[int, int]:
    """Validate options and inputs before any work; returns ``(n, k)``."""
    where = f"GPTQ layer {name!r}"
    if weight.ndim != 2:
        raise UserInputError(f"{where}: weight must be 2-D [n, k], got {tuple(weight.shape)}")
    n, k = weight.shape
    if tuple(hessian.shape) != (k, k):
        raise UserInputError(f"{where}: hessian must be [{k}, {k}], got {tuple(hessian.shape)}")
    if not 2 <= bits <= 8:
        raise UserInputError(f"{where}: bits must be in 2..8, got {bits}")
    if group_size != -1 and group_size < 1:
        raise UserInputError(f"{where}: group_size must be -1 or >= 1, got {group_size}")
    if block_size < 1:
        raise UserInputError(f"{where}: block_size must be >= 1, got {block_size}")
    if not damp > 0:
        raise UserInputError(f"{where}: damp must be > 0 (fraction of mean diag(H)), e.g. 0.01")
    if not torch.isfinite(weight).all():
        raise NumericsError(f"{where}: weight contains NaN/inf; check the checkpoint")
    if not torch.isfinite(hessian).all():
        raise NumericsError(
            f"{where}: Hessian contains NaN/inf; check the calibration activations "
            "(try a float32 or bfloat16 model dtype)"
        )
    return n, k
