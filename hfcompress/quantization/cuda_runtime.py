"""The packed runtime on CUDA: what ``load_compressed(..., device="cuda")`` builds for each quantized Linear.

* ``CudaInt4Linear``: <= 4-bit weights in tinygemm's layout (``aten._convert_weight_to_int4pack``, run on the
  GPU) multiplied by ``aten._weight_int4pack_mm`` (bf16 tensor-core kernel, Ampere or newer). Needs N % 8 == 0,
  a kernel group of 32/64/128/256 columns that divides the quantization group (a larger or per-channel group
  is split into kernel groups repeating its scale, which is exact) and K % 32 == 0. Activation-ordered
  checkpoints (``g_idx``) are served by permuting K once at load and the activations' columns per call.
* ``CudaInt8Linear``: per-channel codes (8 bits, or <= 4 bits tinygemm cannot take) kept as int8 and multiplied
  as ``linear(x, q.to(bf16)) * scale`` (gpt-fast's weight-only int8; ``torch.compile`` fuses the conversion into
  the GEMM). Not ``aten._weight_int8pack_mm``: its CUDA kernel is one thread per output, uncoalesced reads.
* ``CachedDequantLinear``: everything else (int8 groups, group-wise widths tinygemm cannot take, group-wise
  weights on pre-Ampere GPUs) is dequantized once at load and kept as a bf16 weight: correct, as fast as the
  float model, and as large. One warning names these layers.

Nothing unpacks the checkpoint's int32 words in a forward pass.

tinygemm's conventions, read from PyTorch's ``aten/src/ATen/native/cuda/int4mm.cu``:

* input of the converter: uint8 (N, K/2), element ``2i`` of a row in the byte's **high** nibble and ``2i+1`` in
  its low nibble (:func:`pack_nibbles`); output int32 (N/8, K/(16 * inner_k_tiles), 32, inner_k_tiles/2): each
  32-bit word holds the eight 4-bit values one lane of an ``mma.m16n8k16`` reads for two k-tiles
  (:func:`tinygemm_layout_reference` and :func:`tinygemm_unpack_reference` spell the permutation out);
* dequantization per element: ``w = (u - 8) * scale + zero`` with ``u`` in [0, 15] and (scale, zero) from
  ``scales_and_zeros[k // group_size, n]`` (bf16 (K/g, N, 2)), one bf16 fused multiply-add;
* product: bf16 activations (M, K) against those bf16 weights, float32 accumulation, bf16 output (M, N).

With our codes ``q = u - 8`` (b <= 4 bits, in [-8, 7]) and zero points ``z``: ``w = (q - z) * s``, so
``zero = -z * s`` (:func:`tinygemm_scales_and_zeros`).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .packed import (
    cat_rows,
    Int8PackedLinear,
    PackedLinear,
)

logger = logging.getLogger(__name__)

__all__ = ["CudaInt4Linear", "CudaInt8Linear", "CachedDequantLinear", "build_cuda_linear", "finish_cuda_model",
           "tinygemm_supports", "tinygemm_kernel_group_size", "tinygemm_inner_k_tiles", "pack_nibbles",
           "tinygemm_scales_and_zeros", "tinygemm_layout_reference", "tinygemm_unpack_reference",
           "tinygemm_mm_reference"]

TINYGEMM_GROUP_SIZES = (256, 128, 64, 32)  # qGroupSize values _weight_int4pack_mm_cuda dispatches on
TINYGEMM_INNER_K_TILES = (8, 4, 2)  # 16/8/4-byte loads; K must be a multiple of 16 * inner_k_tiles
TINYGEMM_N_TILE = 8  # rows of one mma.m16n8k16 B tile; N must be a multiple (the output has N rounded up)
TINYGEMM_K_TILE = 16
TINYGEMM_MIN_CAPABILITY = (8, 0)  # the kernel uses bf16 mma instructions (Ampere and newer)


# ------------------------------------------------------------------------------------------------------
# Which layers tinygemm takes
# ------------------------------------------------------------------------------------------------------
def tinygemm_kernel_group_size(out_features: int, in_features: int, group_size: int | None) -> int | None:
    """The kernel group for a (N, K) weight quantized with ``group_size`` (None = per channel), or None.

    The kernel group must divide the quantization group (each kernel group then sees one scale) and K.
    """
    if out_features % TINYGEMM_N_TILE:
        return None
    if group_size is not None and in_features % group_size:
        return None  # a ragged last group
    span = in_features if group_size is None else math.gcd(group_size, in_features)
    return next((g for g in TINYGEMM_GROUP_SIZES if span % g == 0), None)


def tinygemm_inner_k_tiles(in_features: int) -> int | None:
    """The widest inner-k-tile count whose tile (16 x count columns) divides K (8 as gpt-fast uses, else 4, 2)."""
    return next((t for t in TINYGEMM_INNER_K_TILES if in_features % (TINYGEMM_K_TILE * t) == 0), None)


def tinygemm_device_supported(device: torch.device) -> bool:
    """Whether ``device`` runs ``_weight_int4pack_mm`` (an NVIDIA GPU of compute capability 8.0 or newer)."""
    if device.type != "cuda" or torch.version.hip is not None or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= TINYGEMM_MIN_CAPABILITY


def tinygemm_supports(out_features: int, in_features: int, group_size: int | None, num_bits: int) -> bool:
    """Whether the shape and scheme fit tinygemm (the device is checked apart)."""
    return (num_bits <= 4 and tinygemm_kernel_group_size(out_features, in_features, group_size) is not None
            and tinygemm_inner_k_tiles(in_features) is not None)


# ------------------------------------------------------------------------------------------------------
# Our codes -> tinygemm's inputs (pure functions, tested on CPU)
# ------------------------------------------------------------------------------------------------------
def pack_nibbles(unsigned: torch.Tensor) -> torch.Tensor:
    """Values in [0, 15] (N, K) -> uint8 (N, K/2): column 2i in the high nibble, 2i+1 in the low one (the input
    layout of ``aten._convert_weight_to_int4pack`` on CUDA)."""
    if unsigned.shape[1] % 2:
        raise ValueError(f"pack_nibbles needs an even number of columns, got {unsigned.shape[1]}")
    u = unsigned.to(torch.uint8)
    return ((u[:, 0::2] << 4) | u[:, 1::2]).contiguous()


def tinygemm_scales_and_zeros(scale: torch.Tensor, zero_point: torch.Tensor | None, group_size: int | None,
                              kernel_group_size: int, in_features: int,
                              dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Per-group scale (N, G) and integer zero point (N, G) or None -> tinygemm's (K/g, N, 2) (scale, zero).

    Kernel group ``c`` covers columns [c*g, (c+1)*g), inside quantization group ``c*g // group_size``.
    ``zero = -zero_point * scale`` turns tinygemm's ``(q + 8 - 8) * scale + zero`` into ``(q - z) * s``.
    """
    g = kernel_group_size
    group_of_kernel_group = torch.arange(in_features // g, device=scale.device) * g // (group_size or in_features)
    scale_g = scale.to(torch.float32)[:, group_of_kernel_group]  # (N, K/g)
    if zero_point is None:
        zero_g = torch.zeros_like(scale_g)
    else:
        zero_g = -zero_point.to(torch.float32)[:, group_of_kernel_group] * scale_g
    return torch.stack([scale_g.t(), zero_g.t()], dim=-1).to(dtype).contiguous()  # (K/g, N, 2)


def tinygemm_layout_reference(weight_uint8: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """What ``aten._convert_weight_to_int4pack`` (CUDA) computes, in PyTorch, from the producer's side
    (``matrix_to_m16n8k16_Bint4_layout``): uint8 (N, K/2) -> int32 (N/8, K/(16*t), 32, t/2).

    Word ``[nt, ko, lane, j]`` serves row ``n = 8 nt + lane // 4`` and k-tiles ``kt = ko*t + 2j`` and ``kt + 1``.
    It gathers four bytes ``v0..v3`` at byte columns ``8 kt + lane % 4`` (+4), ``8 (kt+1) + lane % 4`` (+4) and
    stores their high nibbles in nibbles 0-3 and their low nibbles in nibbles 4-7.
    """
    n, half_k = weight_uint8.shape
    k, t = 2 * half_k, inner_k_tiles
    if n % TINYGEMM_N_TILE or k % (TINYGEMM_K_TILE * t) or t not in TINYGEMM_INNER_K_TILES:
        raise ValueError(f"tinygemm layout needs N % 8 == 0 and K % {16 * t} == 0, got ({n}, {k})")
    dev = weight_uint8.device
    lane = torch.arange(32, device=dev)
    row = (torch.arange(n // 8, device=dev)[:, None] * 8 + lane // 4)[:, None, :, None, None]  # (N/8,1,32,1,1)
    kt = (torch.arange(k // (16 * t), device=dev)[:, None] * t + 2 * torch.arange(t // 2, device=dev))  # (KO, t/2)
    base = torch.stack([8 * kt, 8 * kt + 4, 8 * (kt + 1), 8 * (kt + 1) + 4], dim=-1)  # (KO, t/2, 4)
    cols = base[None, :, None] + (lane % 4)[None, None, :, None, None]  # (1, KO, 32, t/2, 4)
    v = weight_uint8.to(torch.int64)[row, cols]  # (N/8, KO, 32, t/2, 4)
    high, low = v >> 4, v & 0xF
    shifts = 4 * torch.arange(4, device=dev)
    word = ((high << shifts).sum(-1) | (low << (shifts + 16)).sum(-1))  # nibbles 0-3 high, 4-7 low
    word = torch.where(word >= 1 << 31, word - (1 << 32), word)  # reinterpret as int32
    return word.to(torch.int32).contiguous()


def tinygemm_unpack_reference(packed: torch.Tensor) -> torch.Tensor:
    """int32 (N/8, K/(16*t), 32, t/2) -> the values u (N, K) in [0, 15], from the consumer's side: how
    ``_weight_int4pack_mm`` reads a word (``convert_i4x8_to_bf16x2x4`` puts nibbles (i, i+4) in bf16 pair i)
    and where ``mma.m16n8k16`` takes each pair (B fragment: lane holds rows k = 2 (lane % 4) + {0, 1}, + 8 for
    its second register, of column n = lane // 4; pairs 0, 1 feed the first k-tile, 2, 3 the second)."""
    nt, ko, lanes, half_t = packed.shape
    t = 2 * half_t
    dev = packed.device
    words = packed.to(torch.int64) & 0xFFFFFFFF
    nibble = (words[..., None] >> (4 * torch.arange(8, device=dev))) & 0xF  # (NT, KO, 32, t/2, 8)
    lane = torch.arange(32, device=dev)
    kt = torch.arange(ko, device=dev)[:, None] * t + 2 * torch.arange(half_t, device=dev)  # (KO, t/2)
    pair_k = torch.stack([16 * kt, 16 * kt + 8, 16 * (kt + 1), 16 * (kt + 1) + 8], dim=-1)  # pair i -> first k
    first_k = pair_k[None, :, None] + 2 * (lane % 4)[None, None, :, None, None]  # (1, KO, 32, t/2, 4)
    k_of_nibble = torch.cat([first_k, first_k + 1], dim=-1)  # nibble i (< 4) then nibble i + 4 (the pair's 2nd)
    n_of_lane = torch.arange(nt, device=dev)[:, None] * 8 + lane // 4  # (NT, 32)
    n_idx = n_of_lane[:, None, :, None, None].expand_as(nibble)
    out = torch.full((nt * 8, ko * 16 * t), -1, dtype=torch.int64, device=dev)
    out[n_idx.reshape(-1), k_of_nibble.expand_as(nibble).reshape(-1)] = nibble.reshape(-1)
    return out


def tinygemm_mm_reference(x: torch.Tensor, packed: torch.Tensor, group_size: int,
                          scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """What ``aten._weight_int4pack_mm`` (CUDA) computes, in PyTorch: bf16 x (M, K) -> bf16 (M, N).

    Each weight is one bf16 fused multiply-add ``(u - 8) * scale + zero`` (exact in float64, then one rounding);
    the products accumulate in float32 and the sum is rounded to bf16.
    """
    u = tinygemm_unpack_reference(packed)  # (N, K)
    n, k = u.shape
    sz = scales_and_zeros.to(torch.float64)  # (K/g, N, 2)
    group = torch.arange(k, device=u.device) // group_size
    scale, zero = sz[group, :, 0].t(), sz[group, :, 1].t()  # (N, K)
    weight = ((u.to(torch.float64) - 8) * scale + zero).to(torch.bfloat16)  # (N, K)
    return (x.to(torch.bfloat16).float() @ weight.float().t()).to(torch.bfloat16)


# ------------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------------
# PyTorch's CUDA ops, named once (the CPU tests put the references above in their place).
def _convert_weight_to_int4pack(weight_uint8: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack(weight_uint8, inner_k_tiles)


def _weight_int4pack_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int,
                        scales_and_zeros: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scales_and_zeros)


class CudaInt4Linear(PackedLinear):
    """<= 4-bit weights in tinygemm's layout on the GPU, multiplied by ``aten._weight_int4pack_mm``. The kernel
    takes bf16 activations only: float16/float32 activations are multiplied in bf16 and cast back."""

    def __init__(self, q, scale, zero_point, group_size, bias, dtype, device, kernel_group_size, inner_k_tiles,
                 input_permutation: torch.Tensor | None = None):
        n, k = q.shape
        super().__init__(k, n, bias, dtype)
        self.kernel_group_size, self.inner_k_tiles = kernel_group_size, inner_k_tiles
        unsigned = q.to(torch.int16) + 8  # (N, K) in [0, 15]: the kernel subtracts 8
        if unsigned.min() < 0 or unsigned.max() > 15:
            raise ValueError("tinygemm needs quantized values in [-8, 7]")
        nibbles = pack_nibbles(unsigned).to(device)  # (N, K/2) uint8, converted on the device
        self.register_buffer("weight_int4pack", _convert_weight_to_int4pack(nibbles, inner_k_tiles))
        self.register_buffer("scales_and_zeros", tinygemm_scales_and_zeros(
            scale, zero_point, group_size, kernel_group_size, k).to(device))  # (K/g, N, 2) bf16
        self.register_buffer("input_permutation", input_permutation)  # (K,) or None

    def _matmul(self, x):
        if self.input_permutation is not None:
            x = x.index_select(1, self.input_permutation)
        y = _weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), self.weight_int4pack, self.kernel_group_size,
                                self.scales_and_zeros)  # (M, N) bf16
        return y.to(x.dtype)

    def dequantized_weight(self):
        # The layout is opaque; multiplying the identity reads W.T back out (one product per entry).
        eye = torch.eye(self.in_features, dtype=self.compute_dtype, device=self.weight_int4pack.device)
        return self._matmul(eye).t().contiguous()

    @classmethod
    def concatenate(cls, members: list["CudaInt4Linear"]) -> "CudaInt4Linear | None":
        """One module computing every member's output side by side (q/k/v, gate/up), or None. The packed
        weight's first dimension is N/8 tiles and the scales' second is N, so stacking them stacks rows."""
        first = members[0]
        if any((m.kernel_group_size, m.inner_k_tiles, m.bias is None, m.input_permutation is None)
               != (first.kernel_group_size, first.inner_k_tiles, first.bias is None, first.input_permutation is None)
               for m in members):
            return None
        if first.input_permutation is not None and any(
                not torch.equal(m.input_permutation, first.input_permutation) for m in members):
            return None
        fused = cls.fused_shell(members)
        fused.kernel_group_size, fused.inner_k_tiles = first.kernel_group_size, first.inner_k_tiles
        fused.register_buffer("weight_int4pack", cat_rows(members, "weight_int4pack"))
        fused.register_buffer("scales_and_zeros", torch.cat([m.scales_and_zeros for m in members], dim=1))
        fused.register_buffer("input_permutation", first.input_permutation)
        return fused

    def extra_repr(self):
        return (super().extra_repr() + f", kernel=tinygemm int4 (group_size={self.kernel_group_size}, "
                f"inner_k_tiles={self.inner_k_tiles}{', permuted K' if self.input_permutation is not None else ''})")


def int8_matmul_dequantized(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                            zero_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ ((q - z) s).T as ``linear(x, q.to(x.dtype)) * s`` (int8 codes are exact in bf16/fp16/fp32 and
    the per-row scale factors out of the GEMM); the zero point's rank-one term in float32."""
    y = F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)  # (M, N)
    if zero_scale is not None:
        row_sum = x.sum(dim=-1, keepdim=True, dtype=torch.float32)  # (M, 1)
        y = (y.to(torch.float32) - row_sum * zero_scale.to(torch.float32)).to(x.dtype)
    return y


class CudaInt8Linear(Int8PackedLinear):
    """Per-channel int8 weights on the GPU: ``linear(x, q.to(dtype)) * scale`` (see the module docstring).
    Shares :class:`Int8PackedLinear`'s buffers, so q/k/v and gate/up fuse the same way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return PackedLinear.forward(self, x)  # no CPU decode fast path

    def _matmul(self, x):
        return int8_matmul_dequantized(x, self.weight_int8, self.weight_scale, self.zero_scale)

    def extra_repr(self):
        return PackedLinear.extra_repr(self) + ", kernel=int8 (dequantize in the GEMM)"


class CachedDequantLinear(PackedLinear):
    """A quantized layer no GPU kernel here takes: dequantized once at load, then a plain ``linear``."""

    def __init__(self, weight: torch.Tensor, bias, dtype, reason: str):
        n, k = weight.shape
        super().__init__(k, n, bias, dtype)
        self.reason = reason
        self.register_buffer("weight", weight.to(dtype))

    def _matmul(self, x):
        return F.linear(x, self.weight)

    def dequantized_weight(self):
        return self.weight

    def extra_repr(self):
        return super().extra_repr() + f", kernel=dequantized at load ({self.reason})"


# ------------------------------------------------------------------------------------------------------
# Choosing the module; finishing the model
# ------------------------------------------------------------------------------------------------------
def _contiguous_group_permutation(g_idx: torch.Tensor, in_features: int, group_size: int | None):
    """For activation-ordered ``g_idx`` (K,): a column order that makes every group contiguous and in order,
    or None when ``g_idx`` is the plain ``k // group_size`` layout. Raises ValueError if no such order exists."""
    plain = torch.arange(in_features) // (group_size or in_features)
    g_idx = g_idx.to(torch.int64).cpu()
    if torch.equal(g_idx, plain):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], plain):
        raise ValueError("groups of unequal size")
    return perm


def build_cuda_linear(name: str, t: dict, weights, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The CUDA module for one quantized Linear from its checkpoint tensors ``t`` (see ``runtime``'s
    ``_read_module_tensors``): tinygemm int4, dequantize-in-GEMM int8, or a weight dequantized once."""
    n, k = t["shape"]
    bits = weights.num_bits
    group_size = weights.group_size if weights.strategy == "group" else None
    q = kernels.unpack_weight(t["packed"], bits, (n, k))  # (N, K) int8, once at load
    scale, zero_point, g_idx = t["scale"], t["zero_point"], t["g_idx"]
    reason = None
    if bits <= 4:
        perm = None
        if g_idx is not None:
            try:
                perm = _contiguous_group_permutation(g_idx, k, group_size)
            except ValueError:
                reason = "activation-ordered groups of unequal size"
        kernel_group = tinygemm_kernel_group_size(n, k, group_size)
        inner = tinygemm_inner_k_tiles(k)
        if reason is None and not tinygemm_device_supported(device):
            reason = "the GPU has no bf16 tensor cores (compute capability < 8.0) or is not NVIDIA"
        elif reason is None and (kernel_group is None or inner is None):
            reason = (f"tinygemm needs N % 8 == 0, K % 32 == 0 and groups of 32/64/128/256 columns; "
                      f"({n}, {k}) with group_size={group_size}")
        if reason is None:
            if perm is not None:
                q = q[:, perm]
                # group_of(perm[j]) == j // group_size: the permuted scales are the plain layout's.
            return CudaInt4Linear(q, scale, zero_point, group_size, t["bias"], dtype, device, kernel_group, inner,
                                  input_permutation=None if perm is None else perm.to(device))
    if group_size is None and g_idx is None:  # per-channel (any width, also <= 4 bits tinygemm cannot take)
        return CudaInt8Linear(q, scale, zero_point, t["bias"], dtype).to(device)
    if reason is None:
        reason = f"{bits}-bit {'groups' if group_size else 'weights'}{' with g_idx' if g_idx is not None else ''}"
    weight = kernels.dequantize(q, scale, zero_point, group_size, g_idx, dtype=dtype)  # (N, K)
    return CachedDequantLinear(weight.to(device), t["bias"], dtype, reason).to(device)


def finish_cuda_model(model: nn.Module) -> list[str]:
    """After every quantized layer is built (and siblings fused by
    :func:`~hfcompress.quantization.packed.fuse_shared_input_projections`, tinygemm int4 included): warn once about
    the layers that run from a dequantized bf16 copy (returned by name)."""
    fallbacks = [(name, m.reason) for name, m in model.named_modules() if isinstance(m, CachedDequantLinear)]
    if fallbacks:
        reasons = sorted({reason for _, reason in fallbacks})
        logger.warning("load_compressed(device=cuda): %d quantized layer(s) run from a bf16 copy dequantized at "
                       "load (full-size weights) because %s: %s", len(fallbacks), "; ".join(reasons),
                       ", ".join(name for name, _ in fallbacks))
    return [name for name, _ in fallbacks]
