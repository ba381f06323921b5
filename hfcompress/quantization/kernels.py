"""Pure tensor math for running compressed-tensors weights: unpack, dequantize, and re-layout for
PyTorch's native weight-only kernels.

Conventions (those of compressed-tensors' ``pack-quantized`` format):

* a quantized weight ``q`` is a signed integer tensor (N, K) (N = out_features, K = in_features) with
  values in ``[-2**(b-1), 2**(b-1) - 1]``;
* ``scale`` is (N, G) with G = ceil(K / group_size) groups along K (G = 1 for per-channel);
* ``zero_point`` is a signed integer (N, G) or ``None`` (symmetric);
* the real weight is ``W[n, k] = (q[n, k] - zero_point[n, g(k)]) * scale[n, g(k)]`` with
  ``g(k) = k // group_size`` (or ``g_idx[k]`` for activation-ordered checkpoints).

Native CPU kernels take such weights without materialising W in float:

* ``hfcompress::int4_gemv`` (our kernel, see native.py) computes ``x @ W.T`` for b <= 4-bit codes repacked
  at load (``pack_int4_native``) with per-group float32 scales and offsets ``(8 + zero_point) * scale``;
  groups of any multiple of 32 (or per channel), any N and K.

* ``hfcompress::int8_gemv`` (our kernel, see native.py) and ``aten._weight_int8pack_mm(x, q_int8 (N, K),
  scale (N,))`` compute ``x @ (q * scale[:, None]).T``:
  per-channel only, no zero point. An asymmetric zero point is handled by linearity:
  ``x @ ((q - z) s).T = x @ (q s).T - rowsum(x) (z s)``.
* ``aten._weight_int4pack_mm_for_cpu(x, packed, g, scales_and_zeros (K/g, N, 2))`` computes
  ``x @ W.T`` with ``W[n, k] = (u[n, k] - 8) * scale + zero`` for unsigned nibbles ``u`` in [0, 15]
  and kernel group sizes g in {32, 64, 128, 256}. A signed b-bit value (b <= 4) is ``u - 8``, so
  ``zero = -zero_point * scale``. A larger (or per-channel) quantization group is split into kernel
  groups that repeat its scale, which is exact.
"""

from __future__ import annotations

import math
import sys

import torch

from ..core import native
from ..core.native import int8_gemv, int8_gemv_available

# Group sizes accepted by aten._weight_int4pack_mm_for_cpu (checked in its CPU implementation).
INT4_KERNEL_GROUP_SIZES = (256, 128, 64, 32)
# aten._convert_weight_to_int4pack_for_cpu needs N divisible by this.
INT4_KERNEL_N_MULTIPLE = 16
# aten._weight_int8pack_mm on CPU (torch 2.13) reads K in blocks of 16 and crashes (segfault, no error)
# for other K, so we only hand it K % 16 == 0.
INT8_KERNEL_K_MULTIPLE = 16


def qrange(num_bits: int) -> tuple[int, int]:
    """Signed integer range of a b-bit quantized value, e.g. (-8, 7) for 4 bits."""
    return -(1 << (num_bits - 1)), (1 << (num_bits - 1)) - 1


# The pack-quantized layout has one packer and unpacker: compressed-tensors' own (``pack_to_int32`` /
# ``unpack_from_int32``): element i of a row stored unsigned (q + 2**(b-1)) at bits [i*b, (i+1)*b) of the row's
# little-endian bit stream. It replaced a hand-written scatter packer that was checked against it at run time:
# at 4096x4096 int4 on one thread it packs in 0.40 s vs 0.99 s and unpacks in 0.015 s vs 1.6 s (min of 7).
def pack_weight(codes: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Signed codes (N, K) int8 -> compressed-tensors' dense int32 packing (N, ceil(K*b/32))."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(codes, num_bits)


def pack_zero_point(zero_point: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Signed zero points (N, G) -> int32 (ceil(N*b/32), G), packed along the output dimension."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(zero_point.to(torch.int8), num_bits, packed_dim=0)


def unpack_weight(packed: torch.Tensor, num_bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """compressed-tensors dense int32 packing (N, ceil(K*b/32)) -> signed int8 (N, K).

    Values are stored with an offset of 2**(b-1) (unsigned), element i at bit i*b of the row's bit stream.
    """
    n, k = shape
    if num_bits == 8 and sys.byteorder == "little" and packed.shape == (n, k // 4) and k % 4 == 0:
        # 8-bit: the int32 words are just the row's bytes, each u = q + 128; u ^ 0x80 read as int8 is q.
        return (packed.contiguous().view(torch.uint8) ^ 0x80).view(torch.int8).reshape(n, k)
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    return unpack_from_int32(packed, num_bits, torch.Size(shape))


def unpack_zero_point(zero_point: torch.Tensor, num_bits: int, out_features: int) -> torch.Tensor:
    """Stored zero point -> signed int8 (N, G).

    compressed-tensors packs asymmetric zero points along dim 0 (N) into int32 (ceil(N*b/32), G), possibly
    zero-padded to N rows; older writers stored them unpacked as int8 (N, G) or float.
    """
    if zero_point.dtype == torch.int32:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        num_groups = zero_point.shape[-1]
        words = math.ceil(out_features * num_bits / 32)
        # Rows past the packed words are zero padding (see checkpoint.check_zero_point). Unpacked as rows of
        # the transposed words: compressed-tensors 0.20's packed_dim=0 path views a transposed tensor as bytes,
        # which fails when every column fits in one word (N * b <= 32).
        columns = zero_point[:words].t().flatten().reshape(num_groups, words)  # (G, words), row-major
        return unpack_from_int32(columns, num_bits, torch.Size((num_groups, out_features))).t().contiguous()
    return zero_point.round().to(torch.int8) if zero_point.is_floating_point() else zero_point.to(torch.int8)


def expand_groups(values: torch.Tensor, in_features: int, group_size: int | None,
                  g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group values (N, G) -> per-column values (N, K)."""
    if g_idx is not None:
        return values[:, g_idx.long()]
    if group_size is None or values.shape[1] == 1:
        return values.expand(values.shape[0], in_features)
    return values.repeat_interleave(group_size, dim=1)[:, :in_features]


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None,
               group_size: int | None = None, g_idx: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - zero_point) * scale`` broadcast over groups along K: (N, K) in ``dtype``.

    Computed in float32 (exact for |q - z| <= 2**8 and then one rounding of the product), cast at the end.
    """
    in_features = q.shape[1]
    values = q.to(torch.float32)  # (N, K)
    if zero_point is not None:
        values = values - expand_groups(zero_point.to(torch.float32), in_features, group_size, g_idx)
    return (values * expand_groups(scale.to(torch.float32), in_features, group_size, g_idx)).to(dtype)


# ------------------------------------------------------------------------------------------------------
# int4: hfcompress::int4_gemv (native.py), else aten._weight_int4pack_mm_for_cpu
# ------------------------------------------------------------------------------------------------------
def int4_native_supports(in_features: int, group_size: int | None) -> bool:
    """Whether our int4 kernel takes this quantization: per channel, or groups of a multiple of 32 (its
    activation blocks); any N and K, a ragged last group included."""
    return group_size is None or group_size >= in_features or group_size % 32 == 0


def pack_int4_native(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Signed q (N, K) (b <= 4 bits), scale (N, G), zero point (N, G) or None -> our kernel's
    (packed uint8, scale float32 (N, G), offset float32 (N, G) = (8 + z) * s or None)."""
    packed = native.int4_pack(q.to(torch.int8).contiguous())
    scale = scale.to(torch.float32).contiguous()
    offset = None if zero_point is None else ((8 + zero_point.to(torch.float32)) * scale).contiguous()
    return packed, scale, offset


def int4_matmul_native(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                       out_features: int, group_size: int) -> torch.Tensor:
    """x (M, K) -> (M, N) in x's dtype through hfcompress::int4_gemv (float32/bfloat16 in, else via float32)."""
    if x.dtype in (torch.float32, torch.bfloat16):
        return native.int4_gemv(x, packed, scale, offset, out_features, group_size)
    return native.int4_gemv(x.float(), packed, scale, offset, out_features, group_size).to(x.dtype)

def int4_kernel_group_size(out_features: int, in_features: int, group_size: int | None) -> int | None:
    """The kernel group size to use for a (N, K) weight quantized with ``group_size`` (None = per channel),
    or None when the CPU int4 kernel cannot take the shape.

    The kernel group must divide both K and the quantization group, so each kernel group sees one scale.
    """
    if out_features % INT4_KERNEL_N_MULTIPLE:
        return None
    span = in_features if group_size is None else math.gcd(group_size, in_features)
    if group_size is not None and in_features % group_size:
        return None  # a ragged last group: leave it to the dequantize fallback
    return next((g for g in INT4_KERNEL_GROUP_SIZES if span % g == 0), None)


def pack_int4_cpu(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                  group_size: int | None, kernel_group_size: int,
                  dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed q (N, K) with b <= 4 bits -> (packed uint8 weight, scales_and_zeros (K/g, N, 2) in ``dtype``)."""
    n, k = q.shape
    g = kernel_group_size
    unsigned = (q.to(torch.int32) + 8)  # (N, K) in [0, 15]: the kernel subtracts 8
    if unsigned.min() < 0 or unsigned.max() > 15:
        raise ValueError("int4 kernel needs quantized values in [-8, 7]")
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned.contiguous(), 1)
    # Per-kernel-group scale (N, K/g): column c of it covers weight columns [c*g, (c+1)*g).
    group_of_kernel_group = torch.arange(k // g) * g // (group_size or k)  # (K/g,)
    scale_g = scale.to(torch.float32)[:, group_of_kernel_group]  # (N, K/g)
    if zero_point is None:
        zero_g = torch.zeros_like(scale_g)
    else:
        zero_g = -zero_point.to(torch.float32)[:, group_of_kernel_group] * scale_g
    scales_and_zeros = torch.stack([scale_g.t(), zero_g.t()], dim=-1).to(dtype).contiguous()  # (K/g, N, 2)
    return packed, scales_and_zeros


def int4_matmul_cpu(x: torch.Tensor, packed: torch.Tensor, kernel_group_size: int,
                    scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x (M, K) in the scales' dtype -> (M, N)."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, kernel_group_size, scales_and_zeros)


# ------------------------------------------------------------------------------------------------------
# int8: hfcompress::int8_gemv (native.py), else aten._weight_int8pack_mm
# ------------------------------------------------------------------------------------------------------
def int8_kernel_supports(in_features: int) -> bool:
    """Whether a per-channel int8 weight with this K can run packed (our kernel takes any K)."""
    return in_features % INT8_KERNEL_K_MULTIPLE == 0 or int8_gemv_available()


# Without our kernel: from this many rows (prefill) on, converting the int8 weight to the activation dtype and
# using the dense GEMM beats PyTorch's weight-streaming kernel, which is built for a few rows (decode). (Our
# kernel makes that choice itself, one tile of weight rows at a time.)
INT8_DENSE_MIN_ROWS = 16


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                zero_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ ((q - z) * s).T with per-channel float32 s (N,) and ``zero_scale`` = z * s (N,) or None."""
    decode = x.shape[0] < INT8_DENSE_MIN_ROWS
    if x.dtype in (torch.float32, torch.bfloat16) and x.device.type == "cpu" and int8_gemv_available():
        # any K; decode streams the int8 weights, prefill multiplies dequantized tiles (native.py)
        y = int8_gemv(x, q, scale)  # (M, N)
    elif decode and x.shape[1] % INT8_KERNEL_K_MULTIPLE == 0:
        y = torch.ops.aten._weight_int8pack_mm(x, q, scale.to(x.dtype))  # (M, N)
    else:
        # Prefill, or a K PyTorch's kernel cannot take: int8 codes are exact in bfloat16/float16/float32, and
        # the scale is per output row, so it factors out of the dense GEMM.
        y = torch.nn.functional.linear(x, q.to(x.dtype)) * scale.to(x.dtype)  # (M, N)
    if zero_scale is not None:
        # (x @ (q s).T) - rowsum(x) * (z s): the zero point's contribution is rank one.
        # Subtract in float32 so the correction adds no rounding of its own.
        row_sum = x.sum(dim=-1, keepdim=True, dtype=torch.float32)  # (M, 1)
        y = (y.to(torch.float32) - row_sum * zero_scale.to(torch.float32)).to(x.dtype)
    return y
