"""GPTQ against a straightforward float64 implementation of the OBS updates it batches."""

import pytest
import torch

from hfcompress.quantization import primitives as P
from hfcompress.quantization.gptq import gptq_quantize


def _problem(out=12, n=40, tokens=400, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=gen, dtype=torch.float64) / n ** 0.5 + torch.eye(n, dtype=torch.float64)
    x = torch.randn(tokens, n, generator=gen, dtype=torch.float64) @ mix  # correlated inputs
    w = torch.randn(out, n, generator=gen, dtype=torch.float64)
    return w, x.t() @ x / tokens


def _reference(w, hessian, scale, zero_point, bits, damp, order):
    """Quantize columns in ``order``; after each, update the remaining ones by the OBS formula
    ``dW = -(w_j - q_j) / [H^-1]_jj * [H^-1]_{j,:}`` and eliminate j from the inverse Hessian."""
    w = w.clone()
    h = hessian + damp * torch.diagonal(hessian).mean() * torch.eye(hessian.shape[0], dtype=hessian.dtype)
    hinv = torch.linalg.inv(h)
    codes = torch.zeros(w.shape, dtype=torch.int8)
    remaining = list(order)
    for j in order:
        q = P.quantize(w[:, j:j + 1], scale, zero_point, bits, None)
        codes[:, j] = q[:, 0]
        err = (w[:, j] - P.dequantize(q, scale, zero_point, None)[:, 0]) / hinv[j, j]
        remaining.remove(j)
        w[:, remaining] -= err.unsqueeze(1) * hinv[j, remaining].unsqueeze(0)
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return codes


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block_size", [7, 128])
def test_per_channel_gptq_matches_the_float64_reference(symmetric, block_size):
    w, hessian = _problem()
    codes, scale, zero_point = gptq_quantize(w, hessian, 3, None, symmetric=symmetric, damp=0.01,
                                             block_size=block_size)
    ref_scale, ref_zp = P.compute_qparams(w, 3, None, symmetric, scale_dtype=torch.float64)
    torch.testing.assert_close(scale, ref_scale)
    expected = _reference(w, hessian, ref_scale, ref_zp, 3, 0.01, range(w.shape[1]))
    assert torch.equal(codes, expected)


def test_act_order_visits_columns_by_decreasing_hessian_diagonal():
    w, hessian = _problem(seed=1)
    scale_h = torch.linspace(0.2, 3.0, hessian.shape[0], dtype=torch.float64)
    hessian = hessian * scale_h.unsqueeze(0) * scale_h.unsqueeze(1)
    codes, scale, zp = gptq_quantize(w, hessian, 4, None, damp=0.01, block_size=16, act_order=True)
    order = torch.argsort(torch.diagonal(hessian), descending=True).tolist()
    assert torch.equal(codes, _reference(w, hessian, scale, zp, 4, 0.01, order))


def test_lazy_block_updates_do_not_change_grouped_results():
    w, hessian = _problem(n=64)
    a = gptq_quantize(w, hessian, 4, 16, damp=0.01, block_size=64)
    b = gptq_quantize(w, hessian, 4, 16, damp=0.01, block_size=5)  # blocks straddle groups
    assert torch.equal(a[0], b[0])  # codes
    torch.testing.assert_close(a[1], b[1], rtol=1e-12, atol=0)  # scales (summation order differs)


@pytest.mark.parametrize("group", [None, 8])
def test_gptq_beats_round_to_nearest_on_the_layer_objective(group):
    w, hessian = _problem(n=64, seed=2)
    codes, scale, zp = gptq_quantize(w.float(), hessian.float(), 3, group, damp=0.01)
    gptq = P.output_error(w - P.dequantize(codes, scale, zp, group).double(), hessian)
    rtn = P.output_error(w - P.fake_quantize(w, 3, group, True), hessian)
    assert gptq < 0.8 * rtn


def test_dead_inputs_are_zeroed_and_do_not_break_the_cholesky():
    w, hessian = _problem()
    hessian[3, :] = 0
    hessian[:, 3] = 0
    codes, scale, zp = gptq_quantize(w, hessian, 4, None)
    assert torch.isfinite(scale).all()
    assert torch.equal(codes[:, 3], torch.zeros_like(codes[:, 3]))


def test_static_groups_fix_every_scale_from_the_original_weights():
    """static_groups: each group's scales are the min-max scales of the *original* weights, and the column
    sweep is the plain OBS recursion with those fixed per-group scales. Without it, later groups get their
    scales from the updated weights, so they differ."""
    w, hessian = _problem(n=48, seed=3)
    group = 16
    codes, scale, zp = gptq_quantize(w, hessian, 3, group, symmetric=False, damp=0.01, block_size=128,
                                     static_groups=True)
    ref_scale, ref_zp = P.compute_qparams(w, 3, group, False, scale_dtype=torch.float64)
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0)
    assert torch.equal(zp, ref_zp)
    expected = torch.zeros_like(codes)
    wk = w.clone()
    h = hessian + 0.01 * torch.diagonal(hessian).mean() * torch.eye(hessian.shape[0], dtype=hessian.dtype)
    hinv = torch.linalg.inv(h)
    remaining = list(range(w.shape[1]))
    for j in range(w.shape[1]):
        g = j // group
        q = P.quantize(wk[:, j:j + 1], ref_scale[:, g:g + 1], ref_zp[:, g:g + 1], 3, None)
        expected[:, j] = q[:, 0]
        err = (wk[:, j] - P.dequantize(q, ref_scale[:, g:g + 1], ref_zp[:, g:g + 1], None)[:, 0]) / hinv[j, j]
        remaining.remove(j)
        wk[:, remaining] -= err.unsqueeze(1) * hinv[j, remaining].unsqueeze(0)
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    assert torch.equal(codes, expected)
    lazy = gptq_quantize(w, hessian, 3, group, symmetric=False, damp=0.01, block_size=128)
    torch.testing.assert_close(lazy[1][:, 0], scale[:, 0])  # the first group sees no updates yet
    assert not torch.allclose(lazy[1][:, 1:], scale[:, 1:])
