"""The CUDA runtime (``load_compressed(..., device="cuda")``).

On any machine: the conversion of our codes to tinygemm's inputs, checked through pure-PyTorch references of
what ``aten._convert_weight_to_int4pack`` and ``aten._weight_int4pack_mm`` compute (written from int4mm.cu, the
layout once from the producer's side and once from the consumer's), the modules' choice and numerics with those
references in place of the CUDA ops, and the one-line error for a device the machine lacks. With a GPU
(``-m cuda``): the same references against PyTorch's real kernels, and whole checkpoints on the GPU.
"""

from __future__ import annotations

import logging

import pytest
import torch

from .conftest import load_dequantized_reference, small_llama, write_ct_checkpoint
from hfcompress.core.devices import resolve_device
from hfcompress.core.errors import ConfigError
from hfcompress.quantization import cuda_runtime as CR
from hfcompress.quantization import kernels

needs_cuda = pytest.mark.cuda


def random_codes(n, k, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int8)


def random_qparams(n, groups, bits, symmetric, seed=1):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, groups, generator=g) * 0.05 + 1e-3  # float32, not bf16-representable
    zero = None
    if not symmetric:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        zero = torch.randint(lo, hi + 1, (n, groups), generator=g, dtype=torch.int8)
    return scale, zero


def emulated_int4_weight(q, scale, zero, group_size, kernel_group, inner_k_tiles):
    """The (N, K) weight tinygemm multiplies by, from the references (identity times W^T)."""
    packed = CR.tinygemm_layout_reference(CR.pack_nibbles(q.to(torch.int16) + 8), inner_k_tiles)
    sz = CR.tinygemm_scales_and_zeros(scale, zero, group_size, kernel_group, q.shape[1])
    eye = torch.eye(q.shape[1], dtype=torch.bfloat16)
    return CR.tinygemm_mm_reference(eye, packed, kernel_group, sz).t().double()


def bf16_weight_bound(q, scale, zero, group_size, g_idx=None):
    """|tinygemm's weight - (q - z) s| <= 2^-8 |s| (|q| + 2|z| + |q - z|): bf16 (unit roundoff 2^-8) rounds the
    scale, the zero -z s and the fused multiply-add once each."""
    k = q.shape[1]
    s = kernels.expand_groups(scale.double(), k, group_size, g_idx)
    z = torch.zeros_like(s) if zero is None else kernels.expand_groups(zero.double(), k, group_size, g_idx)
    qd = q.double()
    return 2.0 ** -8 * s * (qd.abs() + 2 * z.abs() + (qd - z).abs()) * 1.001 + 1e-30


# ------------------------------------------------------------------------------------------------------
# Pure conversion math
# ------------------------------------------------------------------------------------------------------
def test_pack_nibbles_puts_even_columns_in_the_high_nibble():
    u = torch.tensor([[1, 2, 15, 0]])
    assert CR.pack_nibbles(u).tolist() == [[0x12, 0xF0]]


@pytest.mark.parametrize("inner_k_tiles", [2, 4, 8])
def test_layout_reference_round_trips_through_the_consumer_side(inner_k_tiles):
    """Producer (converter) and consumer (mma fragment) readings of int4mm.cu agree: every value lands where
    the kernel reads it, none twice."""
    n, k = 24, 16 * inner_k_tiles * 3
    u = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(inner_k_tiles))
    packed = CR.tinygemm_layout_reference(CR.pack_nibbles(u), inner_k_tiles)
    assert packed.shape == (n // 8, k // (16 * inner_k_tiles), 32, inner_k_tiles // 2)
    assert packed.dtype == torch.int32
    assert torch.equal(CR.tinygemm_unpack_reference(packed), u.long())


def test_layout_reference_matches_a_hand_worked_word():
    """Lane 5 of tile (0, 0): row 5 // 4 = 1, byte columns 1, 5, 9, 13; nibbles 0-3 are the bytes' high halves."""
    u8 = torch.zeros(8, 32, dtype=torch.uint8)
    u8[1, 1], u8[1, 5], u8[1, 9], u8[1, 13] = 0x12, 0x34, 0x56, 0x78
    word = CR.tinygemm_layout_reference(u8, 2)[0, 0, 5, 0].item() & 0xFFFFFFFF
    assert word == 0x86427531


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, None, 512], ids=lambda g: f"g{g}")
def test_reference_kernel_reproduces_our_dequantized_weight(bits, symmetric, group_size):
    """tinygemm's (u - 8) * scale + zero in bf16 equals our (q - z) * s up to the bf16 roundings of the scale,
    of the zero (-z s) and of the result, each at most 2^-8 relative (bf16's unit roundoff):
    |error| <= 2^-8 |s| (|q| + 2|z| + |q - z|)."""
    n, k = 16, 1024
    q = random_codes(n, k, bits)
    groups = 1 if group_size is None else k // group_size
    scale, zero = random_qparams(n, groups, bits, symmetric)
    kernel_group = CR.tinygemm_kernel_group_size(n, k, group_size)
    assert kernel_group == (256 if group_size in (None, 512) else group_size)
    inner = CR.tinygemm_inner_k_tiles(k)
    ours = kernels.dequantize(q, scale, zero, group_size).double()  # (N, K) float32 math
    emulated = emulated_int4_weight(q, scale, zero, group_size, kernel_group, inner)
    bound = bf16_weight_bound(q, scale, zero, group_size)
    assert ((emulated - ours).abs() <= bound).all()
    # The bound is tight enough to catch a wrong convention: an off-by-one zero point or a swapped nibble order.
    if not symmetric:
        shifted = emulated_int4_weight(q, scale, zero + 1, group_size, kernel_group, inner)
        assert not ((shifted - ours).abs() <= bound).all()
    swapped = CR.tinygemm_unpack_reference(CR.tinygemm_layout_reference(
        CR.pack_nibbles((q.to(torch.int16) + 8).reshape(n, -1, 2).flip(-1).reshape(n, k)), inner))
    assert not torch.equal(swapped, (q.long() + 8))


def test_reference_kernel_rounds_once_for_bf16_scales_without_zero_points():
    """With a bf16 scale and no zero point, q * s is exact in float32: the kernel's weight is its one bf16 rounding."""
    q = random_codes(8, 256, 4)
    scale = random_qparams(8, 2, 4, True)[0].to(torch.bfloat16).float()
    ours = kernels.dequantize(q, scale, None, 128)
    assert torch.equal(emulated_int4_weight(q, scale, None, 128, 128, 8), ours.to(torch.bfloat16).double())


def test_reference_matmul_accumulates_in_float32():
    q, (scale, zero) = random_codes(16, 256, 4), random_qparams(16, 2, 4, False)
    x = torch.randn(3, 256).to(torch.bfloat16)
    weight = emulated_int4_weight(q, scale, zero, 128, 128, 8)  # bf16 values, held in float64
    packed = CR.tinygemm_layout_reference(CR.pack_nibbles(q.to(torch.int16) + 8), 8)
    y = CR.tinygemm_mm_reference(x, packed, 128, CR.tinygemm_scales_and_zeros(scale, zero, 128, 128, 256))
    exact = x.double() @ weight.t()
    # float32 sums of bf16 products, one bf16 rounding at the end
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.double(), exact, rtol=2 ** -8, atol=1e-5 * float(exact.abs().max()))


@pytest.mark.parametrize("shape,group_size,expected", [
    ((16, 256), 128, 128), ((16, 4096), None, 256), ((16, 512), 512, 256), ((16, 96), 32, 32),
    ((16, 256), 16, None),  # groups smaller than the kernel's smallest
    ((12, 256), 128, None),  # N % 8 != 0
    ((16, 688), 16, None),  # the fallback group of a 688-wide layer
    ((16, 200), 40, None),  # no power-of-two kernel group divides 40
])
def test_tinygemm_kernel_group_size(shape, group_size, expected):
    assert CR.tinygemm_kernel_group_size(*shape, group_size) == expected


def test_inner_k_tiles_is_the_widest_that_divides_k():
    assert [CR.tinygemm_inner_k_tiles(k) for k in (4096, 192, 96, 48)] == [8, 4, 2, None]


def test_activation_order_permutation_makes_groups_contiguous():
    g_idx = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0])  # group size 4, columns shuffled
    perm = CR._contiguous_group_permutation(g_idx, 8, 4)
    assert torch.equal(g_idx[perm], torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    assert CR._contiguous_group_permutation(torch.arange(8) // 4, 8, 4) is None
    with pytest.raises(ValueError):
        CR._contiguous_group_permutation(torch.tensor([0, 0, 0, 1, 1, 1, 1, 1]), 8, 4)


# ------------------------------------------------------------------------------------------------------
# Modules, with the references standing in for the CUDA ops
# ------------------------------------------------------------------------------------------------------
@pytest.fixture()
def emulated_cuda_ops(monkeypatch):
    """Run the CUDA modules on CPU: the references replace the two aten ops, and the CPU counts as Ampere."""
    monkeypatch.setattr(CR, "_convert_weight_to_int4pack", CR.tinygemm_layout_reference)
    monkeypatch.setattr(CR, "_weight_int4pack_mm", CR.tinygemm_mm_reference)
    monkeypatch.setattr(CR, "tinygemm_device_supported", lambda device: True)


def module_tensors(n, k, bits, group_size, symmetric, g_idx=None, seed=0):
    q = random_codes(n, k, bits, seed)
    groups = 1 if group_size is None else k // group_size
    scale, zero = random_qparams(n, groups, bits, symmetric, seed + 1)
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    packed = pack_to_int32(q, bits)
    return dict(packed=packed, scale=scale, zero_point=zero, g_idx=g_idx, bias=None, shape=(n, k)), q


class Scheme:
    def __init__(self, num_bits, strategy, group_size=None):
        self.num_bits, self.strategy, self.group_size = num_bits, strategy, group_size


def test_int4_module_multiplies_by_the_dequantized_weight(emulated_cuda_ops):
    t, q = module_tensors(32, 256, 4, 64, symmetric=False)
    module = CR.build_cuda_linear("layer", t, Scheme(4, "group", 64), torch.bfloat16, torch.device("cpu"))
    assert type(module) is CR.CudaInt4Linear and module.kernel_group_size == 64 and module.inner_k_tiles == 8
    weight = kernels.dequantize(q, t["scale"], t["zero_point"], 64)
    x = torch.randn(5, 256).to(torch.bfloat16)
    expected = x.float() @ weight.t()
    assert torch.allclose(module(x).float(), expected, rtol=0.02, atol=0.02 * float(expected.abs().max()))
    bound = bf16_weight_bound(q, t["scale"], t["zero_point"], 64)
    assert ((module.dequantized_weight().double() - weight.double()).abs() <= bound).all()


def test_int4_activation_ordered_checkpoint_is_permuted_once(emulated_cuda_ops):
    k, group = 256, 64
    g_idx = torch.randperm(k, generator=torch.Generator().manual_seed(3)) // group  # each group has 64 columns
    t, q = module_tensors(16, k, 4, group, symmetric=True, g_idx=g_idx)
    module = CR.build_cuda_linear("layer", t, Scheme(4, "group", group), torch.bfloat16, torch.device("cpu"))
    assert type(module) is CR.CudaInt4Linear and module.input_permutation is not None
    weight = kernels.dequantize(q, t["scale"], None, group, g_idx)  # (N, K) in the checkpoint's column order
    bound = bf16_weight_bound(q, t["scale"], None, group, g_idx)
    assert ((module.dequantized_weight().double() - weight.double()).abs() <= bound).all()


def test_fused_int4_projections_concatenate_rows(emulated_cuda_ops):
    members = []
    for seed, n in enumerate((32, 16, 16)):
        t, _ = module_tensors(n, 128, 4, 32, symmetric=False, seed=10 * seed)
        members.append(CR.build_cuda_linear("p", t, Scheme(4, "group", 32), torch.bfloat16, torch.device("cpu")))
    fused = CR.CudaInt4Linear.concatenate(members)
    x = torch.randn(2, 128).to(torch.bfloat16)
    assert torch.equal(fused(x), torch.cat([m(x) for m in members], dim=-1))


def test_int8_and_fallback_modules(caplog):
    """Per-channel int8 multiplies in the GEMM; int8 groups and shapes tinygemm cannot take are dequantized once,
    and one warning names them."""
    t8, q8 = module_tensors(24, 72, 8, None, symmetric=False)
    int8 = CR.build_cuda_linear("mlp.down_proj", t8, Scheme(8, "channel"), torch.float32, torch.device("cpu"))
    assert type(int8) is CR.CudaInt8Linear
    x = torch.randn(3, 72)
    expected = x.double() @ kernels.dequantize(q8, t8["scale"], t8["zero_point"], None).double().t()
    assert torch.allclose(int8(x).double(), expected, rtol=1e-5, atol=1e-5)

    t4c, q4c = module_tensors(12, 64, 4, None, symmetric=True)  # N % 8 != 0, per channel: int8 codes
    narrow = CR.build_cuda_linear("narrow", t4c, Scheme(4, "channel"), torch.float32, torch.device("cpu"))
    assert type(narrow) is CR.CudaInt8Linear
    assert torch.equal(narrow.dequantized_weight(), kernels.dequantize(q4c, t4c["scale"], None, None))

    t4, q4 = module_tensors(12, 64, 4, 32, symmetric=True)  # N % 8 != 0
    model = torch.nn.Module()
    model.odd = CR.build_cuda_linear("odd", t4, Scheme(4, "group", 32), torch.float32, torch.device("cpu"))
    model.int8 = int8
    assert type(model.odd) is CR.CachedDequantLinear
    assert torch.equal(model.odd.weight, kernels.dequantize(q4, t4["scale"], None, 32))
    with caplog.at_level(logging.WARNING, logger="hfcompress.quantization.cuda_runtime"):
        assert CR.finish_cuda_model(model) == ["odd"]
    assert len(caplog.records) == 1 and "odd" in caplog.text and "int8" not in caplog.text


@pytest.mark.parametrize("bits,strategy,group_size,symmetric,expected", [
    (4, "group", 32, False, CR.CudaInt4Linear), (4, "channel", None, True, CR.CudaInt4Linear),
    (8, "channel", None, False, CR.CudaInt8Linear),
])
def test_whole_checkpoint_through_the_cuda_modules(tmp_path, emulated_cuda_ops, monkeypatch, bits, strategy,
                                                   group_size, symmetric, expected):
    """load_compressed with every Linear built as on CUDA (emulated kernels, on CPU): q/k/v and gate/up fused,
    logits within 3x the bf16 reference's own error, generate works."""
    from hfcompress.quantization import runtime as R

    build = R.build_packed_module

    def as_on_cuda(name, module, weights, reader, dtype, device):
        if not isinstance(module, torch.nn.Linear):
            return build(name, module, weights, reader, dtype, device)
        return CR.build_cuda_linear(name, R._read_module_tensors(name, module, weights, reader), weights, dtype,
                                    device)

    monkeypatch.setattr(R, "build_packed_module", as_on_cuda)
    path = write_ct_checkpoint(small_llama(), tmp_path / "ckpt", num_bits=bits, strategy=strategy,
                               group_size=group_size, symmetric=symmetric)
    ours = R.load_compressed(path, progress=False)
    assert CR.finish_cuda_model(ours) == []  # what load_compressed does on CUDA after fusing (int4 too): no fallbacks
    attention = ours.model.layers[0].self_attn
    assert type(attention.q_proj) is R.SharedInputSlice and type(R.kernel_module(attention.v_proj)) is expected
    assert R.kernel_module(attention.q_proj) is R.kernel_module(attention.k_proj)
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = load_dequantized_reference(path, torch.float32)(tokens).logits
        bf16_error = (load_dequantized_reference(path, torch.bfloat16)(tokens).logits.float() - reference).abs().max()
        error = (ours(tokens).logits.float() - reference).abs().max()
    assert error <= 3 * bf16_error
    assert ours.generate(tokens[:1, :4], max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (1, 7)


# ------------------------------------------------------------------------------------------------------
# Devices
# ------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cuda_without_cuda_is_a_one_line_error(tmp_path):
    from hfcompress.quantization.runtime import load_compressed

    with pytest.raises(ConfigError, match="device 'cuda' was requested but") as info:
        resolve_device("cuda")
    assert "\n" not in str(info.value)
    path = write_ct_checkpoint(small_llama(), tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="device='cpu'"):
        load_compressed(path, device="cuda", progress=False)
    assert resolve_device("auto") == torch.device("cpu")


def test_unknown_device_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    assert resolve_device(None) == torch.device("cpu")


# ------------------------------------------------------------------------------------------------------
# On a GPU
# ------------------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("inner_k_tiles", [2, 4, 8])
def test_cuda_converter_matches_the_reference_layout(inner_k_tiles):
    u = torch.randint(0, 16, (64, 512), generator=torch.Generator().manual_seed(0))
    nibbles = CR.pack_nibbles(u)
    theirs = torch.ops.aten._convert_weight_to_int4pack(nibbles.cuda(), inner_k_tiles).cpu()
    assert torch.equal(theirs, CR.tinygemm_layout_reference(nibbles, inner_k_tiles))


@needs_cuda
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("m", [1, 7, 33])
def test_cuda_int4_kernel_matches_the_reference(group_size, m):
    n, k = 256, 1024
    q, (scale, zero) = random_codes(n, k, 4), random_qparams(n, k // group_size, 4, False)
    nibbles = CR.pack_nibbles(q.to(torch.int16) + 8)
    sz = CR.tinygemm_scales_and_zeros(scale, zero, group_size, group_size, k)
    x = torch.randn(m, k).to(torch.bfloat16)
    theirs = torch.ops.aten._weight_int4pack_mm(
        x.cuda(), torch.ops.aten._convert_weight_to_int4pack(nibbles.cuda(), 8), group_size, sz.cuda()).cpu()
    ours = CR.tinygemm_mm_reference(x, CR.tinygemm_layout_reference(nibbles, 8), group_size, sz)
    # same bf16 weights and inputs; only the float32 summation order differs, then one bf16 rounding each
    assert torch.allclose(theirs.float(), ours.float(), rtol=2 ** -7, atol=1e-3 * float(ours.float().abs().max()))


@needs_cuda
@pytest.mark.parametrize("bits,strategy,group_size,symmetric,expected", [
    (4, "group", 32, False, CR.CudaInt4Linear), (4, "channel", None, True, CR.CudaInt4Linear),
    (8, "channel", None, False, CR.CudaInt8Linear), (8, "group", 32, True, CR.CachedDequantLinear),
])
def test_cuda_checkpoint_logits_match_the_dequantized_model(tmp_path, bits, strategy, group_size, symmetric,
                                                            expected):
    from hfcompress.quantization.runtime import kernel_module, load_compressed

    path = write_ct_checkpoint(small_llama(), tmp_path / "ckpt", num_bits=bits, strategy=strategy,
                               group_size=group_size, symmetric=symmetric)
    ours = load_compressed(path, device="cuda", progress=False)
    assert type(kernel_module(ours.model.layers[0].mlp.down_proj)) is expected
    # The reference runs on the CPU in float32: transformers' compressed-tensors load dispatches the model with
    # accelerate hooks that keep it on the device it was loaded on.
    reference = load_dequantized_reference(path)
    tokens = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        logits = ours(tokens).logits
        want = reference(tokens.cpu()).logits.float()
    assert logits.device.type == "cuda"
    got = logits.float().cpu()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    text = ours.generate(tokens[:1, :4], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert text.shape == (1, 8)
