"""Quantization math against float64 references."""

import math

import pytest
import torch

from hfcompress.quantization import primitives as P


def _reference_fake_quant(w: torch.Tensor, bits: int, group: int | None, symmetric: bool) -> torch.Tensor:
    """Straightforward float64 min-max quantize/dequantize, one group at a time."""
    w = w.double()
    qmin, qmax = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    out = torch.empty_like(w)
    g = w.shape[1] if group is None else group
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], g):
            x = w[r, c:c + g]
            lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
            if symmetric:
                scale = max(-lo, hi) / ((qmax - qmin) / 2) or 1.0
                q = torch.clamp(torch.round(x / scale), qmin, qmax)
                out[r, c:c + g] = q * scale
            else:
                scale = (hi - lo) / (qmax - qmin) or 1.0
                zp = min(max(round(qmin - lo / scale), qmin), qmax)
                q = torch.clamp(torch.round(x / scale) + zp, qmin, qmax)
                out[r, c:c + g] = (q - zp) * scale
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [None, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_matches_float64_reference(bits, group, symmetric):
    w = torch.randn(6, 48, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    ours = P.fake_quantize(w, bits, group, symmetric)
    torch.testing.assert_close(ours, _reference_fake_quant(w, bits, group, symmetric), rtol=0, atol=1e-12)
    # Nearest rounding inside the range: the error of every value is at most half a step.
    scale, zero_point = P.compute_qparams(w, bits, group, symmetric, scale_dtype=torch.float64)
    step = scale.repeat_interleave(48 // scale.shape[1], dim=1)
    assert ((ours - w).abs() <= step / 2 + 1e-12).float().mean() > 0.95  # clipped extremes may exceed it
    # Codes stay in range and zero is exact.
    codes = P.quantize(w, scale, zero_point, bits, group)
    qmin, qmax = P.quant_range(bits)
    assert codes.dtype == torch.int8 and codes.min() >= qmin and codes.max() <= qmax
    zero = torch.zeros(1, 48, dtype=torch.float64)
    assert torch.equal(P.fake_quantize(torch.cat([w[:1], zero]), bits, group, symmetric)[1], zero[0])


def test_dequantize_is_codes_minus_zero_point_times_scale():
    codes = torch.tensor([[-8, 7, 0, 3]], dtype=torch.int8)
    scale = torch.tensor([[0.5, 2.0]])
    zp = torch.tensor([[1, -2]], dtype=torch.int32)
    assert torch.equal(P.dequantize(codes, scale, zp, 2), torch.tensor([[-4.5, 3.0, 4.0, 10.0]]))
    assert torch.equal(P.dequantize(codes, scale[:, :1], None, None), torch.tensor([[-4.0, 3.5, 0.0, 1.5]]))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("width", [1, 31, 32, 33, 100, 688])
def test_pack_unpack_round_trip_and_layout(bits, width):
    """The one packer (compressed-tensors' own, through kernels.pack_*) round-trips and has the documented
    layout: code i stored unsigned at bits [i*bits, (i+1)*bits) of the row's little-endian bit stream."""
    from hfcompress.quantization import kernels as K

    qmin, qmax = P.quant_range(bits)
    codes = torch.randint(qmin, qmax + 1, (5, width), dtype=torch.int8, generator=torch.Generator().manual_seed(width))
    packed = K.pack_weight(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, P.packed_length(width, bits))
    assert torch.equal(K.unpack_weight(packed, bits, (5, width)), codes)
    assert torch.equal(K.unpack_zero_point(K.pack_zero_point(codes.t(), bits), bits, width), codes.t())
    row = packed[0].tolist()
    stream = sum((word & 0xFFFFFFFF) << (32 * k) for k, word in enumerate(row))
    for i in range(width):
        assert (stream >> (i * bits)) & ((1 << bits) - 1) == codes[0, i].item() - qmin


def test_accumulate_hessian_is_the_mean_outer_product():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 3, 12, generator=gen) for n in (1, 4, 2)]
    hessian, count = torch.zeros(12, 12), 0
    for x in batches:
        hessian, count = P.accumulate_hessian(hessian, count, x)
    rows = torch.cat([x.reshape(-1, 12) for x in batches]).double()
    assert count == rows.shape[0]
    torch.testing.assert_close(hessian.double(), rows.t() @ rows / rows.shape[0], rtol=1e-5, atol=1e-6)


def test_relative_output_error_equals_direct_computation():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=gen, dtype=torch.float64)
    w = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    approx = P.fake_quantize(w, 3, 8, True)
    hessian = x.t() @ x / x.shape[0]
    direct = ((x @ (w - approx).t()).norm() / (x @ w.t()).norm()).item()
    assert P.relative_output_error(w, approx, hessian) == pytest.approx(direct, rel=1e-5)


def test_stochastic_rounding_is_unbiased():
    """E[dequantize(quantize(w))] = w: each element rounds up with probability p = frac(w / scale), so the
    mean of K draws has variance scale^2 p (1 - p) / K; the standardised errors must look N(0, 1)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=gen, dtype=torch.float64)
    for symmetric in (True, False):
        scale, zp = P.compute_qparams(w, 4, 16, symmetric, stochastic=True, scale_dtype=torch.float64)
        K = 400
        draws = torch.stack([P.dequantize(P.quantize(w, scale, zp, 4, 16, "stochastic", gen), scale, zp, 16)
                             for _ in range(K)])
        mean = draws.mean(0)
        step = scale.repeat_interleave(16, dim=1)
        offset = 0.0 if zp is None else zp.double().repeat_interleave(16, dim=1)
        p = torch.frac(w / step + offset)  # probability of rounding up (never clamped: see compute_qparams)
        var = step ** 2 * p * (1 - p) / K
        keep = var > 0
        z = ((mean - w)[keep] / var[keep].sqrt())
        n = z.numel()
        assert abs(z.mean().item()) < 5 / math.sqrt(n)
        assert abs(z.pow(2).mean().item() - 1) < 5 * math.sqrt(2 / n)
    # Nearest rounding is biased: the same statistic is far off.
    scale, zp = P.compute_qparams(w, 4, 16, True, scale_dtype=torch.float64)
    nearest = P.dequantize(P.quantize(w, scale, zp, 4, 16), scale, zp, 16)
    assert ((nearest - w).abs() / (scale.repeat_interleave(16, 1) / (2 * math.sqrt(400)))).mean() > 5


def test_stochastic_rounding_is_seeded():
    w = torch.randn(4, 32)
    scale, zp = P.compute_qparams(w, 4, 32, True, stochastic=True)
    a = P.quantize(w, scale, zp, 4, 32, "stochastic", torch.Generator().manual_seed(3))
    b = P.quantize(w, scale, zp, 4, 32, "stochastic", torch.Generator().manual_seed(3))
    c = P.quantize(w, scale, zp, 4, 32, "stochastic", torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("width, group, expected", [
    (688, 128, 16), (256, 128, 128), (96, 64, 32), (192, 128, 64), (7, 128, None), (100, 3, 2),
    (64, None, None), (64, 128, 64),
])
def test_fallback_group_size(width, group, expected):
    assert P.fallback_group_size(width, group) == expected


def test_clip_search_never_worse_than_minmax_on_its_objective():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=gen)
    w[:, 0] *= 8  # outliers make clipping worthwhile
    x = torch.randn(256, 64, generator=gen) * torch.linspace(0.1, 3, 64)
    hessian = x.t() @ x / 256
    for h in (None, hessian):
        clip = P.search_clip(w, 3, 16, True, hessian=h)
        assert clip.shape == (16, 4) and clip.min() >= 0.5 and clip.max() <= 1
        clipped = P.fake_quantize(w, 3, 16, True, clip=clip)
        plain = P.fake_quantize(w, 3, 16, True)
        if h is None:
            assert (w - clipped).pow(2).sum() <= (w - plain).pow(2).sum()
        else:
            assert P.output_error(w - clipped, h) <= P.output_error(w - plain, h) + 1e-6
        assert (clip < 1).any()
