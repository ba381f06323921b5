"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", Algorithm 1) as one function of a weight and its input Hessian.

Columns are quantized one at a time; the error of each is spread over the not-yet-quantized columns through
the inverse Hessian (the OBS update, eq. 3), using its upper Cholesky factor so that the update of column
``i`` only needs row ``i`` of it (eq. 5), and batched lazily in blocks of ``block_size`` columns.
"""

from __future__ import annotations

import logging

import torch

from . import primitives as P

logger = logging.getLogger(__name__)


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (Algorithm 1, line 2).

    Damping keeps the inverse well conditioned; if the matrix is still not positive definite (e.g. rank
    deficient calibration), the damping is raised tenfold up to three times before giving up.
    """
    mean_diag = torch.diagonal(hessian).mean()
    for attempt in range(4):
        lam = damp * (10 ** attempt)
        # The damping added to the diagonal in place, and each intermediate freed once used: at most two
        # (in, in) matrices besides ``hessian`` are alive (the streaming engine's memory bound counts on it).
        damped = hessian.clone()
        damped.diagonal().add_(lam * mean_diag if mean_diag > 0 else max(lam, 1e-8))
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info.item() == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info.item() == 0:
                if attempt:
                    logger.warning("GPTQ: Hessian was not positive definite; used damp=%g", lam)
                return upper
    raise torch.linalg.LinAlgError(f"GPTQ: Hessian is not positive definite even with damp={lam}")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    observer: str = "minmax",
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize ``weight`` (out, in) against the input second moment ``hessian`` (in, in).

    Returns codes (out, in) int8, scales (out, G) in ``weight``'s dtype and zero points (out, G) or None.
    Scales of a group are fixed when GPTQ reaches its first column, from the already-updated weights (the
    paper's "lazy" grouping), unless ``static_groups``: then every group's scales are fixed up front from the
    original weights, as llm-compressor does. With ``act_order`` columns are visited in order of decreasing
    ``diag(H)`` but a group keeps its original consecutive columns (its scales are then always fixed up front
    — llm-compressor's ``actorder="weight"``), so the stored format is the plain group layout.
    Computes in float32, or float64 when given float64.
    """
    work = torch.promote_types(weight.dtype, torch.float32)
    scale_dtype = weight.dtype
    W = weight.detach().to(work).clone()  # (out, in)
    H = hessian.detach().to(work).clone()  # (in, in)
    out_features, in_features = W.shape
    g = in_features if group_size is None else group_size
    G = in_features // g
    stochastic = rounding == "stochastic"

    dead = torch.diagonal(H) == 0  # inputs that are always zero: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0

    def params_for(columns: torch.Tensor, hblock: torch.Tensor | None):
        clip = 1.0
        if observer == "mse":
            clip = P.search_clip(columns, bits, None, symmetric, hessian=hblock)
        return P.compute_qparams(columns, bits, None, symmetric, clip=clip, stochastic=stochastic,
                                 scale_dtype=scale_dtype)

    scale = torch.empty(out_features, G, dtype=scale_dtype, device=W.device)
    zero_point = None if symmetric else torch.empty(out_features, G, dtype=torch.int32, device=W.device)
    static = act_order or static_groups or group_size is None
    if static:  # fix every group's scales from the (dead-column-zeroed) original weights
        for group in range(G):
            cols = slice(group * g, (group + 1) * g)
            s, z = params_for(W[:, cols], H[cols, cols])
            scale[:, group] = s[:, 0]
            if z is not None:
                zero_point[:, group] = z[:, 0]

    perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    order = perm if perm is not None else torch.arange(in_features, device=W.device)
    order_list = order.tolist()

    Hinv = inverse_hessian_cholesky(H, damp)  # upper (in, in)
    codes = torch.zeros(out_features, in_features, dtype=torch.int8, device=W.device)
    qmin, qmax = P.quant_range(bits)
    current_group, s_col, s_work, z_col, z_scale = -1, None, None, None, None
    same_dtype = scale_dtype == work
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        # The block transposed, (columns, out): each column is one contiguous row for the per-column updates.
        W1 = W[:, i1:i2].t().contiguous()
        Err1 = torch.zeros_like(W1)
        Q1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        pivots = torch.diagonal(Hinv1).tolist()
        for i in range(i2 - i1):
            column = order_list[i1 + i]  # original index of this column
            group = column // g
            if not static and column % g == 0:
                # Scales from the group's current weights, i.e. with every update so far: in-block
                # columns hold them in W1; later columns have not received this block's yet.
                stop = i1 + i + g
                current = W1[i:i + g].t()
                if stop > i2:
                    later = W[:, i2:stop] - Err1[:i].t() @ Hinv[i1:i1 + i, i2:stop]
                    current = torch.cat([W1[i:].t(), later], dim=1)
                s, z = params_for(current, H[i1 + i:stop, i1 + i:stop] if observer == "mse" else None)
                scale[:, group] = s[:, 0]
                if z is not None:
                    zero_point[:, group] = z[:, 0]
            if group != current_group:  # this group's scale/zero point as columns, converted once
                current_group = group
                s_col, s_work = scale[:, group], scale[:, group].to(work)
                z_col = None if zero_point is None else zero_point[:, group].to(work)
                z_scale = None if zero_point is None else zero_point[:, group].to(scale_dtype)
            w = W1[i]  # (out,)
            if stochastic:
                q = P.round_values(w / s_work, rounding, generator)
            else:
                q = torch.round(w / s_work)
            if z_col is not None:
                q += z_col
            q.clamp_(qmin, qmax)
            Q1[i] = q
            # dequantized in the scale's dtype, as P.dequantize and compressed-tensors do
            if same_dtype:
                deq = q if z_col is None else q - z_col
                err = Err1[i]
                torch.div(w - deq * s_work, pivots[i], out=err)
            else:
                deq = q.to(scale_dtype) if z_scale is None else q.to(scale_dtype) - z_scale
                err = (w - (deq * s_col).to(work)) / pivots[i]
                Err1[i] = err
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)  # OBS update, eq. (3)
        codes[:, i1:i2] = Q1.t().to(torch.int8)
        W[:, i2:] -= Err1.t() @ Hinv[i1:i2, i2:]  # lazy batch update of the remaining columns

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes, scale, zero_point
