"""Quantization math as small pure functions of tensors: scales, rounding, (de)quantization, bit packing,
Hessian accumulation and the clipping search. No modules, no models; each is tested against float64 math.

Conventions (the compressed-tensors ``int`` scheme, so what we compute is what we store):

* ``bits``-bit codes are signed integers in ``[qmin, qmax] = [-2**(bits-1), 2**(bits-1) - 1]`` kept in int8;
* a weight ``W`` (out, in) is split into groups of ``group_size`` consecutive input columns (``None`` = one
  group per output row, i.e. per-channel); each (row, group) has a ``scale`` and, if asymmetric, an integer
  ``zero_point`` in ``[qmin, qmax]``;
* ``dequantize(q) = (q - zero_point) * scale``, computed in the scale's dtype.
"""

from __future__ import annotations

import math

import torch

# Clipping grid of the MSE observer: shrink the range by 0%, 2.5%, ..., 50% (AWQ's auto-clip searches the
# same span; llm-compressor's MSE observer a narrower one).
CLIP_GRID = 21
CLIP_MAX_SHRINK = 0.5


def quant_range(bits: int) -> tuple[int, int]:
    """Signed integer range of ``bits``-bit codes."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def fallback_group_size(in_features: int, group_size: int | None) -> int | None:
    """The group size a layer of width ``in_features`` actually uses.

    ``group_size`` itself when it divides the width; otherwise the largest power of two below it that does
    (so int4 kernels that want power-of-two groups still apply); otherwise ``None`` (per-channel). A width
    of 688 with ``group_size=128`` gives 16 (688 = 16 * 43).
    """
    if group_size is None or in_features % group_size == 0:
        return group_size
    size = 1 << (group_size.bit_length() - 1)
    if size == group_size:
        size //= 2
    while size >= 2:
        if in_features % size == 0:
            return size
        size //= 2
    return None


def num_groups(in_features: int, group_size: int | None) -> int:
    return 1 if group_size is None else in_features // group_size


def _grouped(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(out, in) -> (out, G, g) view; per-channel is a single group of the whole row."""
    out_features, in_features = weight.shape
    g = in_features if group_size is None else group_size
    if in_features % g:
        raise ValueError(f"group size {g} does not divide {in_features} columns")
    return weight.reshape(out_features, in_features // g, g)


def compute_qparams(
    weight: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    clip: float | torch.Tensor = 1.0,
    stochastic: bool = False,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scales (out, G) and integer zero points (out, G) (``None`` if symmetric) of ``weight`` (out, in).

    ``clip`` (a float or (out, G) tensor in (0, 1]) shrinks the observed range first (the MSE observer
    searches it). Nearest rounding uses the whole code range (symmetric: ``absmax / ((qmax - qmin) / 2)``,
    as GPTQ and compressed-tensors do). Stochastic rounding moves a value up to one step *away* from its
    nearest code, so its scales leave that step free — symmetric ``absmax / qmax``; asymmetric one level less
    with a zero point rounded up — which keeps every value inside the range: no clamping, hence
    ``E[dequantize(quantize(w))] = w`` exactly.
    """
    qmin, qmax = quant_range(bits)
    grouped = _grouped(weight, group_size)  # (out, G, g)
    grouped = grouped.to(torch.promote_types(grouped.dtype, torch.float32))
    lo = grouped.amin(dim=-1).clamp(max=0)  # zero must be representable exactly
    hi = grouped.amax(dim=-1).clamp(min=0)
    if isinstance(clip, torch.Tensor):
        clip = clip.to(grouped.dtype)
    lo, hi = lo * clip, hi * clip
    if symmetric:
        absmax = torch.maximum(-lo, hi)
        scale = absmax / (qmax if stochastic else (qmax - qmin) / 2)
    else:
        scale = (hi - lo) / ((qmax - qmin - 1) if stochastic else (qmax - qmin))
    # An all-zero group: any positive scale represents it exactly (codes = zero point).
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if scale_dtype is not None:
        # Round the scale to its storage dtype first so that codes are computed with the scale we store.
        scale = scale.to(scale_dtype)
        scale = torch.where(scale > 0, scale, torch.full_like(scale, torch.finfo(scale_dtype).tiny))
    if symmetric:
        return scale, None
    offset = qmin - lo / scale.to(lo.dtype)  # in [qmin, qmax]
    zero_point = torch.ceil(offset) if stochastic else torch.round(offset)
    return scale, zero_point.clamp(qmin, qmax).to(torch.int32)


def round_values(x: torch.Tensor, rounding: str = "nearest", generator: torch.Generator | None = None) -> torch.Tensor:
    """Round to integers: ``nearest`` (ties to even) or ``stochastic``: ``floor(x + u)``, u ~ U[0, 1), which
    rounds up with probability ``frac(x)`` so ``E[round(x)] = x``."""
    if rounding == "nearest":
        return torch.round(x)
    if rounding == "stochastic":
        noise = torch.rand(x.shape, generator=generator, dtype=torch.float32, device="cpu").to(x.device, x.dtype)
        return torch.floor(x + noise)
    raise ValueError(f"unknown rounding {rounding!r}")


def quantize(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Integer codes (out, in) int8 of ``weight`` (out, in) given per-group ``scale``/``zero_point`` (out, G)."""
    qmin, qmax = quant_range(bits)
    grouped = _grouped(weight, group_size)
    work = torch.promote_types(weight.dtype, torch.float32)
    scaled = grouped.to(work) / scale.to(work).unsqueeze(-1)  # (out, G, g)
    codes = round_values(scaled, rounding, generator)
    if zero_point is not None:
        codes = codes + zero_point.to(work).unsqueeze(-1)
    return codes.clamp(qmin, qmax).to(torch.int8).reshape(weight.shape)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    group_size: int | None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``(codes - zero_point) * scale`` -> (out, in), computed in the scale's dtype (as compressed-tensors)."""
    grouped = _grouped(codes, group_size).to(scale.dtype)  # (out, G, g)
    if zero_point is not None:
        grouped = grouped - zero_point.to(scale.dtype).unsqueeze(-1)
    weight = (grouped * scale.unsqueeze(-1)).reshape(codes.shape)
    return weight if dtype is None else weight.to(dtype)


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                  clip: float | torch.Tensor = 1.0, rounding: str = "nearest",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """quantize -> dequantize with min-max (optionally clipped) scales, in ``weight``'s dtype (>= float32)."""
    work = torch.promote_types(weight.dtype, torch.float32)
    scale, zero_point = compute_qparams(weight, bits, group_size, symmetric, clip=clip,
                                        stochastic=rounding == "stochastic", scale_dtype=work)
    codes = quantize(weight, scale, zero_point, bits, group_size, rounding, generator)
    return dequantize(codes, scale, zero_point, group_size)


# --------------------------------------------------------------------------------------------------------
# Dense bit packing into int32 words (compressed-tensors ``pack-quantized``)
# --------------------------------------------------------------------------------------------------------
def packed_length(length: int, bits: int) -> int:
    """int32 words holding ``length`` codes of ``bits`` bits with no padding between codes (the packing itself
    is compressed-tensors' own: :func:`hfcompress.quantization.kernels.pack_weight`)."""
    return math.ceil(length * bits / 32)


# --------------------------------------------------------------------------------------------------------
# Calibration statistics
# --------------------------------------------------------------------------------------------------------
def accumulate_hessian(hessian: torch.Tensor, count: int, inputs: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Running mean of ``x x^T`` over input rows: returns the updated (in, in) matrix and row count.

    ``H = (1/N) sum_n x_n x_n^T`` is the GPTQ Hessian of the layer-wise objective ``||W X - W' X||^2`` up to
    a factor 2 (Frantar et al., 2022, eq. 1-2), which cancels in every use (damping is relative to its
    diagonal). ``inputs`` (..., in) is flattened to rows; the update is in place on ``hessian``.
    """
    rows = inputs.reshape(-1, inputs.shape[-1]).to(hessian.dtype)  # (n, in)
    n = rows.shape[0]
    if n == 0:
        return hessian, count
    total = count + n
    hessian.mul_(count / total)
    hessian.addmm_(rows.t(), rows, alpha=1.0 / total)
    return hessian, total


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``tr(delta H delta^T)``: the mean squared output error ``E||delta x||^2`` of a weight error (out, in)."""
    delta = delta.to(hessian.dtype)
    return ((delta @ hessian) * delta).sum()


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """``sqrt(E||(W - W') x||^2 / E||W x||^2)`` under the input second moment ``hessian``; the plain relative
    Frobenius weight error when no calibration statistics exist (``hessian=None``)."""
    weight, approx = weight.float(), approx.float()
    if hessian is None:
        return ((weight - approx).norm() / weight.norm().clamp_min(1e-30)).item()
    hessian = hessian.float()
    num = output_error(weight - approx, hessian)
    den = output_error(weight, hessian).clamp_min(1e-30)
    return math.sqrt(max(num.item(), 0.0) / den.item())


def group_blocks(hessian: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Diagonal (g, g) blocks of the (in, in) matrix, one per group -> (G, g, g)."""
    in_features = hessian.shape[0]
    g = in_features if group_size is None else group_size
    G = in_features // g
    return hessian.reshape(G, g, G, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def search_clip(
    weight: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    hessian: torch.Tensor | None = None,
    grid: int = CLIP_GRID,
    max_shrink: float = CLIP_MAX_SHRINK,
) -> torch.Tensor:
    """Per-(row, group) clipping ratio in [1 - max_shrink, 1] minimising the quantization error (out, G).

    Without statistics the error is the squared weight error of the group. With the input second moment
    ``hessian`` it is the group's own output error ``d_g H_gg d_g^T`` (AWQ's auto-clip objective, Lin et
    al. 2023, sec. 3.3, without materialising activations). Ratio 1 (plain min-max) is always a candidate,
    so the result is never worse than min-max on this objective.
    """
    weight = weight.float()
    out_features = weight.shape[0]
    G = num_groups(weight.shape[1], group_size)
    blocks = group_blocks(hessian.float(), group_size) if hessian is not None else None  # (G, g, g)
    best_err = torch.full((out_features, G), float("inf"), device=weight.device)
    best = torch.ones(out_features, G, device=weight.device)
    for ratio in torch.linspace(1.0, 1.0 - max_shrink, grid).tolist():
        delta = _grouped(weight - fake_quantize(weight, bits, group_size, symmetric, clip=ratio), group_size)
        if blocks is None:
            err = delta.pow(2).sum(-1)  # (out, G)
        else:
            err = torch.einsum("ogi,gij,ogj->og", delta, blocks, delta)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return best
