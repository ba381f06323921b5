"""Packed modules against float64 references, with error bounds derived from bfloat16 rounding.

Notation: u = 2**-8 is bfloat16's unit roundoff (8 significant bits, round to nearest). For one output
y_n = sum_k x_k W_nk with x already in bfloat16 and W = (q - z) s exact in float64:

* the kernels store s (and the int4 kernel's zero term -z s) in bfloat16: each relative error <= u, so
  the weight used differs from W by <= u (|q s| + |z s|) per entry;
* a kernel may also round the dequantized weight itself to bfloat16 (another <= u |W|), and rounds
  its output to bfloat16 (<= u |y|); float32 accumulation adds <= K 2**-24 sum|x W|, negligible here.

So |y_ours - y_64| <= 2u sum_k |x_k| (|q_nk s| + |z s|) + u |y_n| (+ the int8 path's rank-one correction,
bounded the same way). Bugs in layout, zero-point sign or group mapping give errors of order sum|x W|,
about 100x larger.
"""

from __future__ import annotations

import pytest
import torch

from hfcompress.quantization import kernels
from hfcompress.quantization.runtime import DequantLinear, Int4PackedLinear, Int8PackedLinear

U = 2.0 ** -8


def random_quantized(n, k, bits, group_size, symmetric, seed=0):
    """Random signed codes (N, K), positive scales (N, G), zero points (N, G) or None."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = kernels.qrange(bits)
    q = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int8)
    groups = 1 if group_size is None else -(-k // group_size)
    scale = torch.exp(torch.randn(n, groups, generator=g) * 0.5) * 0.01  # lognormal, > 0
    zero = None if symmetric else torch.randint(lo, hi + 1, (n, groups), generator=g, dtype=torch.int8)
    return q, scale, zero


def reference64(x, q, scale, zero, group_size, g_idx=None):
    """y = x @ ((q - z) s).T in float64, plus the per-output bound terms."""
    k = q.shape[1]
    cols = torch.arange(k) if g_idx is None else g_idx
    group = torch.zeros(k, dtype=torch.long) if group_size is None else (cols // group_size if g_idx is None else g_idx)
    s = scale.double()[:, group]  # (N, K)
    z = torch.zeros_like(s) if zero is None else zero.double()[:, group]
    w = (q.double() - z) * s
    x64 = x.double()
    y = x64 @ w.t()
    magnitude = x64.abs() @ ((q.double() * s).abs() + (z * s).abs()).t()  # sum_k |x| (|q s| + |z s|)
    return y, magnitude


def assert_within_bound(y, x, q, scale, zero, group_size, extra=None, g_idx=None):
    ref, magnitude = reference64(x, q, scale, zero, group_size, g_idx)
    bound = 2 * U * magnitude + U * ref.abs() + 1e-6
    if extra is not None:
        bound = bound + extra
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"max err {err.max():.3g} vs bound {bound[err > bound].min():.3g}"
    # The bound must be tight enough to mean something: far below the signal.
    assert bound.mean() < 0.05 * magnitude.mean()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128, None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_kernel_matches_float64(bits, group_size, symmetric):
    n, k = 48, 256
    q, scale, zero = random_quantized(n, k, bits, group_size, symmetric, seed=bits)
    kernel_group = kernels.int4_kernel_group_size(n, k, group_size)
    assert kernel_group == (256 if group_size is None else group_size)
    layer = Int4PackedLinear(q, scale, zero, group_size, None, torch.bfloat16, kernel_group)
    x = torch.randn(19, k).to(torch.bfloat16)
    assert_within_bound(layer(x), x, q, scale, zero, group_size)
    # dequantized_weight reads back the same weight (bf16 rounding of scale and zero term only)
    w64, magnitude = (t.t() for t in reference64(torch.eye(k), q, scale, zero, group_size))
    assert ((layer.dequantized_weight().double() - w64).abs() <= 2 * U * magnitude + 1e-9).all()


@pytest.mark.parametrize("rows", [5, kernels.INT8_DENSE_MIN_ROWS + 3])  # decode kernel / prefill dense path
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_int8_kernel_matches_float64(symmetric, bits, rows):
    n, k = 40, 96  # N % 16 != 0: shapes the int4 kernel refuses still run here
    q, scale, zero = random_quantized(n, k, bits, None, symmetric, seed=1)
    layer = Int8PackedLinear(q, scale, zero, None, torch.bfloat16)
    x = torch.randn(rows, k).to(torch.bfloat16)
    # Asymmetric: the kernel's own output x @ (q s).T is rounded before the rank-one correction.
    extra = None
    if not symmetric:
        s = scale.double()
        extra = U * (x.double() @ (q.double() * s).t()).abs()
    assert_within_bound(layer(x), x, q, scale, zero, None, extra=extra)


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, 32, True), (8, 32, False), (5, None, False),
                                                        (4, 48, False)])
def test_dequant_fallback_matches_float64(bits, group_size, symmetric):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    n, k = 24, 96
    q, scale, zero = random_quantized(n, k, bits, group_size, symmetric, seed=2)
    packed = pack_to_int32(q, bits)
    layer = DequantLinear(packed, bits, scale, zero, group_size, None, None, torch.bfloat16, (n, k))
    x = torch.randn(4, k).to(torch.bfloat16)
    assert_within_bound(layer(x), x, q, scale, zero, group_size)


def test_dequant_fallback_with_activation_order_g_idx():
    """Activation-ordered checkpoints map column k to group g_idx[k] instead of k // group_size."""
    n, k, group_size = 16, 64, 16
    q, scale, zero = random_quantized(n, k, 4, group_size, False, seed=3)
    g_idx = torch.randperm(k, generator=torch.Generator().manual_seed(0)) // group_size
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    layer = DequantLinear(pack_to_int32(q, 4), 4, scale, zero, group_size, g_idx, None, torch.bfloat16, (n, k))
    x = torch.randn(2, k).to(torch.bfloat16)
    assert_within_bound(layer(x), x, q, scale, zero, group_size, g_idx=g_idx)
    # ...and ignoring g_idx would be wrong by far more than the bound
    plain = DequantLinear(pack_to_int32(q, 4), 4, scale, zero, group_size, None, None, torch.bfloat16, (n, k))
    ref, magnitude = reference64(x, q, scale, zero, group_size, g_idx)
    assert (plain(x).double() - ref).abs().max() > 10 * (2 * U * magnitude).max()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_unpack_matches_compressed_tensors(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    q, _, _ = random_quantized(20, 64, bits, None, True, seed=bits)
    packed = pack_to_int32(q, bits)
    assert torch.equal(kernels.unpack_weight(packed, bits, (20, 64)), q)
    assert torch.equal(kernels.unpack_weight(packed, bits, (20, 64)), unpack_from_int32(packed, bits, q.shape))
    zero = q[:, :3].contiguous()
    assert torch.equal(kernels.unpack_zero_point(pack_to_int32(zero, bits, packed_dim=0), bits, 20), zero)


def test_dequantize_matches_definition():
    q, scale, zero = random_quantized(6, 40, 4, 16, False, seed=5)  # ragged last group (40 = 16 + 16 + 8)
    w = kernels.dequantize(q, scale, zero, 16, dtype=torch.float64)
    for n in range(6):
        for k in range(40):
            expected = (float(q[n, k]) - float(zero[n, k // 16])) * float(scale[n, k // 16])
            assert abs(float(w[n, k]) - expected) <= 1e-7 * abs(expected) + 1e-12


def test_int4_kernel_group_size_rules():
    assert kernels.int4_kernel_group_size(64, 512, None) == 256
    assert kernels.int4_kernel_group_size(64, 512, 512) == 256  # split a large group, same scale
    assert kernels.int4_kernel_group_size(64, 96, None) == 32
    assert kernels.int4_kernel_group_size(64, 96, 48) is None  # 48 is no multiple of 32
    assert kernels.int4_kernel_group_size(72, 512, 128) is None  # N % 16
    assert kernels.int4_kernel_group_size(64, 80, 32) is None  # ragged last group
